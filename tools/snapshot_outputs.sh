#!/usr/bin/env bash
# snapshot_outputs.sh CAFFE2METAL MODELS_DIR DEST: run example, inspect --json, convert (float32,
# float16, forge naming) and verify through the CLI on every model of MODELS_DIR (made by
# tools/snapshot_weights.py) and print one sha256 per output file and per command output.
# Two versions are byte-identical when their listings are: diff the two outputs.
set -u
c2m=$1; models=$2; dest=$3
rm -rf "$dest"; mkdir -p "$dest"
cd "$dest"
$c2m example ex > /dev/null
for f in ex/*; do sha256sum "$f"; done
for m in ex/mobilenet_ssd_example $(ls "$models"/*/deploy.prototxt | sed "s/.prototxt$//"); do
  name=$(basename "$(dirname "$m")"); [ "$name" = ex ] && name=example
  $c2m inspect "$m.prototxt" "$m.caffemodel" --json > "insp_$name.json" 2>&1; echo "inspect $name rc=$?"
  for dt in float32 float16; do
    $c2m convert "$m.prototxt" "$m.caffemodel" -o "out_${name}_$dt" --dtype $dt > "conv_${name}_$dt.txt" 2>&1
    echo "convert $name $dt rc=$?"
  done
  $c2m convert "$m.prototxt" "$m.caffemodel" -o "out_${name}_forge" --naming forge > /dev/null 2>&1
  $c2m verify "$m.prototxt" "$m.caffemodel" "out_${name}_float32" > "ver_$name.txt" 2>&1; echo "verify $name rc=$?"
done
find . -type f ! -path './ex/*' | sort | xargs sha256sum | sed "s#$models#MODELS#"
