"""Write images/root/favicon.ico: the book's icon (images/favicon.svg) as the file browsers
ask every site for, so a page without an icon link (the index redirect) gets no 404."""

from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]


def main():
    size, s = 64, 2  # drawn at 64 px from the SVG's 32-unit grid
    img = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(img)
    draw.rounded_rectangle([0, 0, size - 1, size - 1], radius=6 * s, fill="#2d5fa3")
    draw.rectangle([7 * s, 6 * s, 13 * s - 1, 26 * s - 1], fill="#ffffff")  # W: the wide frozen bar
    draw.rectangle([15 * s, 20 * s, 25 * s - 1, 26 * s - 1], fill="#f9ab00")  # the thin adapter
    out = ROOT / "images" / "root" / "favicon.ico"
    img.save(out, sizes=[(16, 16), (32, 32), (64, 64)])
    print("wrote", out)


if __name__ == "__main__":
    main()
