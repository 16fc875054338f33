"""Converts VQAv2 val (214,354 questions) to the unified schema.

Official files (visualqa.org): v2_OpenEnded_mscoco_val2014_questions.json and
v2_mscoco_val2014_annotations.json; images: COCO val2014.

    python data_prep/convert_vqav2.py --src dl/vqav2 --images dl/coco/val2014 --out data/real

Writes eval/vqa-v2.jsonl under --out, links <out>/images/vqav2 to --images (or copies the used
images with --copy-images) and writes <out>/manifests/ with the counts and every skipped record;
prints counts in / out / skipped. Evaluation records are in the public harness's order (a seed-21
shuffle). --slim keeps the harness's slim subset, --skip-bad skips bad records instead of stopping,
--download fetches the official files first. Rules (image paths, boxes, order, bad input):
vlmlab/data/convert.py.
"""

import sys

from vlmlab.data.convert import run_cli

if __name__ == "__main__":
    sys.exit(run_cli("vqav2", doc=__doc__))
