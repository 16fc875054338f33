"""Converts LLaVA's training conversations (665k instruction mix, 558k captions) to the unified schema.

Official files (liuhaotian/LLaVA-Instruct-150K, LLaVA-Pretrain): llava_v1_5_mix665k.json,
blip_laion_cc_sbu_558k.json; images: LLaVA's playground/data folder (coco/, gqa/, ocr_vqa/,
textvqa/, vg/) or the 558k images folder. Text-only conversations are excluded and listed at the
end.

    python data_prep/convert_llava.py --src dl/llava_v1_5_mix665k.json --images dl/llava/data --out data/real

Writes train/llava.json (--train-file NAME for another name, e.g. llava_pretrain for the 558k file)
under --out, links <out>/images/llava to --images (or copies the used images with --copy-images) and
writes <out>/manifests/ with the counts and every skipped record; prints counts in / out / skipped.
Conversations keep their file order. --skip-bad skips bad records instead of stopping, --download
fetches the official files first. Rules (image paths, bad input): vlmlab/data/convert.py.
"""

import sys

from vlmlab.data.convert import run_cli

if __name__ == "__main__":
    sys.exit(run_cli("llava", doc=__doc__))
