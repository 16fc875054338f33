"""Converts TallyQA test (simple and complex counting questions) to the unified schema.

Official file (manoja328/tallyqa tallyqa.zip): test.json; images: the Visual Genome folder holding
VG_100K/ and VG_100K_2/.

    python data_prep/convert_tallyqa.py --src dl/tallyqa --images dl/visual_genome --out data/real

Writes eval/tally-qa.jsonl under --out, links <out>/images/tallyqa to --images (or copies the used
images with --copy-images) and writes <out>/manifests/ with the counts and every skipped record;
prints counts in / out / skipped. Evaluation records are in the public harness's order (a seed-21
shuffle). --slim keeps the harness's slim subset, --skip-bad skips bad records instead of stopping,
--download fetches the official files first. Rules (image paths, boxes, order, bad input):
vlmlab/data/convert.py.
"""

import sys

from vlmlab.data.convert import run_cli

if __name__ == "__main__":
    sys.exit(run_cli("tallyqa", doc=__doc__))
