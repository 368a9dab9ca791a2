"""The Caffe file formats, and nothing else of the package but ``errors``.

* :mod:`.caffemodel`: binary ``.caffemodel`` read and write (public API), over
  :mod:`.wire_reader`, :mod:`.wire_writer` and :mod:`.records`;
* :mod:`.prototxt`: a ``.prototxt`` file into a ``NetParameter`` with its
  field spans (:mod:`.textproto` splits the text, :mod:`.textfill` fills the
  messages);
* :mod:`.v1`: the V1 net format's upgrade;
* ``proto.caffe_pb2``: the messages compiled from ``caffe.proto``.
"""
