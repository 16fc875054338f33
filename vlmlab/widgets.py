"""ipywidgets browsers: step through evaluated items with the image, question, GT and predicted boxes."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import ImageDraw


def draw_boxes(img, gt=None, pred=None, width: int = 2):
    """Draws normalised boxes (x1, y1, x2, y2 in [0,1] of `img`): GT green, prediction red."""
    img = img.convert("RGB").copy()
    d = ImageDraw.Draw(img)
    w, h = img.size
    for box, colour in ((gt, (0, 200, 0)), (pred, (230, 0, 0))):
        if box is not None:
            d.rectangle([box[0] * w, box[1] * h, box[2] * w, box[3] * h], outline=colour, width=width)
    return img


def item_browser(run_dir: str | Path, benchmark: str, world_root: str | Path, scale: int = 4):
    """A slider over the run's results of `benchmark`; shows the model-frame image and boxes."""
    import ipywidgets as W
    from IPython.display import display

    from vlmlab import geometry
    from vlmlab.data.schema import load_eval, load_image

    rows = [
        json.loads(line)
        for line in (Path(run_dir) / "results" / f"{benchmark}.jsonl").read_text().splitlines()
    ]
    items = {it.id: it for it in load_eval(Path(world_root) / "eval" / f"{benchmark}.jsonl")}
    out = W.Output()

    def show(i):
        r = rows[i]
        it = items[r["id"]]
        img = load_image(world_root, it)
        if "transform" in r:
            img = geometry.ImageTransform.from_dict(r["transform"]).apply(img)
        img = draw_boxes(img, r.get("gt_box"), r.get("parsed"))
        img = img.resize((img.width * scale, img.height * scale))
        with out:
            out.clear_output(wait=True)
            print(f"{r['id']}  score={r['score']}  status={r.get('status', '-')}")
            print("prompt:    ", r["prompt"])
            print("generation:", r["generation"])
            display(img)

    slider = W.IntSlider(min=0, max=max(len(rows) - 1, 0), description="item")
    slider.observe(lambda ch: show(ch["new"]), names="value")
    if rows:
        show(0)
    return W.VBox([slider, out])
