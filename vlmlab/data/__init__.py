"""Datasets in one schema: records and validation (schema), the generated toy world (toyworld)."""

from vlmlab.data.schema import (
    IMAGE_TOKEN,
    ClassItem,
    DataError,
    EvalItem,
    TrainRecord,
    Turn,
    load_class,
    load_eval,
    load_image,
    load_train,
    record_to_dict,
    write_json,
    write_jsonl,
)
from vlmlab.data.toyworld import WORLD_PRESETS, WorldConfig, generate_world, world_vocabulary

__all__ = [
    "IMAGE_TOKEN",
    "WORLD_PRESETS",
    "ClassItem",
    "DataError",
    "EvalItem",
    "TrainRecord",
    "Turn",
    "WorldConfig",
    "generate_world",
    "load_class",
    "load_eval",
    "load_image",
    "load_train",
    "record_to_dict",
    "world_vocabulary",
    "write_json",
    "write_jsonl",
]
