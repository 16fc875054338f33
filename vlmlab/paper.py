# ruff: noqa: E501  (tables of facts read better one row per line)
"""Facts of the study, for the findings notebook: the released weighted results and the findings.

Source: the official release repository raykuo18/vlm-ssm-vision-encoders (results/*.csv), as
collected in the project's paper facts. These are the paper's numbers (Vicuna-7B, LLaVA-665k, real
benchmarks); they are shown beside toy-world numbers, never mixed with them.
"""

RELEASED_RESULTS = [  # weighted VQA / Loc / Overall (%), per released checkpoint
    {"id": "vit-s-in1k-224", "family": "ViT", "init": "IN1K", "params_M": 22, "tokens": 196, "vqa": 57.25, "loc": 17.82, "overall": 51.95},
    {"id": "maxvit-t-in1k-224-s3", "family": "MaxViT", "init": "IN1K", "params_M": 31, "tokens": 196, "vqa": 58.75, "loc": 15.79, "overall": 52.98},
    {"id": "mambavision-b-in1k-224-s3", "family": "MambaVision", "init": "IN1K", "params_M": 98, "tokens": 196, "vqa": 56.53, "loc": 31.17, "overall": 53.12},
    {"id": "vmamba-s-in1k-224-s3", "family": "VMamba", "init": "IN1K", "params_M": 50, "tokens": 196, "vqa": 62.39, "loc": 39.17, "overall": 59.27},
    {"id": "vitdet-b-coco-1024", "family": "ViTDet", "init": "IN1K->COCO", "params_M": 111, "tokens": 4096, "vqa": 63.00, "loc": 43.74, "overall": 60.42},
    {"id": "vmamba-s-coco-1333x800", "family": "VMamba", "init": "IN1K->COCO", "params_M": 50, "tokens": 4150, "vqa": 62.78, "loc": 47.94, "overall": 60.78},
    {"id": "vit-adapter-deit-b-ade20k-512", "family": "ViT-Adapter", "init": "IN1K->ADE20K", "params_M": 134, "tokens": 1024, "vqa": 60.69, "loc": 33.77, "overall": 57.07},
    {"id": "vmamba-s-ade20k-512", "family": "VMamba", "init": "IN1K->ADE20K", "params_M": 50, "tokens": 1024, "vqa": 63.21, "loc": 44.98, "overall": 60.76},
]  # fmt: skip

FINDINGS = [
    "Under matched IN1K initialization, the SSM backbone (VMamba) gives the best overall VQA + localization balance.",
    "Detection/segmentation adaptation generally improves both families; VMamba stays competitive at a much smaller size.",
    "Higher ImageNet accuracy or larger backbones do not reliably give better VLM performance.",
    "Some backbones collapse in localization; a 3-layer MLP connector and square input geometry recover them.",
]
