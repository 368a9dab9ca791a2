"""caffe2metal: fold BatchNorm/Scale into Caffe models and export Metal weights."""
__version__ = "0.1.0"
