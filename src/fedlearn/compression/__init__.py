"""Compressed updates: lossy client halves (quantisation, sparsification, half-precision casts) and the wire
codecs that carry their output exactly; by default updates travel in the model's own dtype."""
from .codecs import DenseCodec, QuantizedCodec, SparseCodec, model_dtype
from .transforms import QSGD, Cast, Compression, RandomK, TopK
from .wire import update_codec

__all__ = ["QSGD", "TopK", "RandomK", "Cast", "Compression", "DenseCodec", "QuantizedCodec", "SparseCodec",
           "model_dtype", "update_codec"]
