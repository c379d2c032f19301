"""The README's pictures, made by the packaged default model through the public verbs (seed 0 unless said):

    python scripts/readme_pictures.py [--out docs/images] [--backend torch] [--model default]

  red.png            dalle2 generate "a red circle" -o red.png (README command 1)
  prompts.png        one picture per prompt of PROMPTS, side by side
  variations.png     red.png, then 4 variations of it
  interpolation.png  "a red circle" -> "a blue square", 6 frames (text interpolation through the prior)
  edit.png           red.png, then edit(source="a red circle", target="a blue circle") at EDIT_AMOUNTS
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

import dalle2_portable as d2
from dalle2_portable.images import save_png

PROMPTS = ["a red circle", "a green triangle", "there is one blue square", "a small purple square on a yellow "
           "background", "an orange circle in the top left corner", "a triangle that is pink"]
EDIT_AMOUNTS = (0.2, 0.4, 0.6)  # the text diff's path: the source's colour fades, then the target's comes


def strip(images, gap: int = 2) -> Image.Image:
    w, h = images[0].size
    out = Image.new("RGB", (len(images) * w + (len(images) - 1) * gap, h), (255, 255, 255))
    for i, im in enumerate(images):
        out.paste(im, (i * (w + gap), 0))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("docs/images"))
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--model", default="default")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    pipe = d2.load_pipeline(args.model, backend=args.backend)
    red = pipe.generate("a red circle", seed=0).images[0]
    pictures = {
        "red.png": red,
        "prompts.png": strip(pipe.generate(PROMPTS, seed=0).images),
        "variations.png": strip([red] + pipe.vary(red, num_images=4, seed=0).images),
        "interpolation.png": strip(pipe.interpolate("a red circle", "a blue square", frames=6, kind="text",
                                                    seed=0).images),
        "edit.png": strip([red] + [pipe.edit(red, source="a red circle", target="a blue circle", amount=amount,
                                             seed=0).images[0] for amount in EDIT_AMOUNTS]),
    }
    for name, image in pictures.items():
        save_png(image, args.out / name, overwrite=True)
        print(f"wrote {args.out / name} ({image.size[0]} x {image.size[1]})")


if __name__ == "__main__":
    main()
