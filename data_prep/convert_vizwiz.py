"""Converts VizWiz val (4,319 questions) to the unified schema.

Official file (VizWiz Annotations.zip): val.json; images: VizWiz val/.

    python data_prep/convert_vizwiz.py --src dl/vizwiz --images dl/vizwiz/val --out data/real

Writes eval/vizwiz.jsonl under --out, links <out>/images/vizwiz to --images (or copies the used
images with --copy-images) and writes <out>/manifests/ with the counts and every skipped record;
prints counts in / out / skipped. Evaluation records are in the public harness's order (a seed-21
shuffle). --slim keeps the harness's slim subset, --skip-bad skips bad records instead of stopping,
--download fetches the official files first. Rules (image paths, boxes, order, bad input):
vlmlab/data/convert.py.
"""

import sys

from vlmlab.data.convert import run_cli

if __name__ == "__main__":
    sys.exit(run_cli("vizwiz", doc=__doc__))
