"""Converts TextVQA val (5,000 questions), as textvqa-ocr and textvqa-pure to the unified schema.

Official file: TextVQA_0.5.1_val.json, with LLaVA's OCR-augmented questions
textvqa_val_v051_ocr.jsonl (without them only textvqa-pure is written); images: TextVQA
train_images/.

    python data_prep/convert_textvqa.py --src dl/textvqa --images dl/textvqa/train_images --out data/real

Writes eval/textvqa-ocr.jsonl and eval/textvqa-pure.jsonl under --out, links <out>/images/textvqa to
--images (or copies the used images with --copy-images) and writes <out>/manifests/ with the counts
and every skipped record; prints counts in / out / skipped. Evaluation records are in the public
harness's order (a seed-21 shuffle). --slim keeps the harness's slim subset, --skip-bad skips bad
records instead of stopping, --download fetches the official files first. Rules (image paths, boxes,
order, bad input): vlmlab/data/convert.py.
"""

import sys

from vlmlab.data.convert import run_cli

if __name__ == "__main__":
    sys.exit(run_cli("textvqa", doc=__doc__))
