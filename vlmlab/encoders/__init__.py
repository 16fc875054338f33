"""Vision encoders behind one API: `load_encoder(name, weights=None, tap=None)`."""

from vlmlab.encoders.base import (
    Encoder,
    EncoderSpec,
    create_encoder,
    freeze,
    list_encoders,
    load_encoder,
    register_encoder,
)

__all__ = [
    "Encoder",
    "EncoderSpec",
    "create_encoder",
    "freeze",
    "list_encoders",
    "load_encoder",
    "register_encoder",
]
