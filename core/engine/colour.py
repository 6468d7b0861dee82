"""Colour preservation for selfies (Gatys et al., *Preserving Color in Neural Artistic Style
Transfer*, 2016): either match the style's colour statistics to the photo before stylizing, or
stylize luminance only and put the photo's chroma back afterwards.

Tensors are (1, 3, H, W) RGB in [0, 1].
"""

from __future__ import annotations

import torch

# ITU-R BT.601 (JPEG) RGB <-> YCbCr, the convention Pillow uses.
_RGB_TO_YCC = torch.tensor(
    [[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]]
)
_YCC_TO_RGB = torch.linalg.inv(_RGB_TO_YCC)


def rgb_to_ycbcr(x: torch.Tensor) -> torch.Tensor:
    """Y in [0, 1], Cb and Cr centred on 0."""
    return torch.einsum("ij,bjhw->bihw", _RGB_TO_YCC.to(x), x)


def ycbcr_to_rgb(x: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ij,bjhw->bihw", _YCC_TO_RGB.to(x), x)


def luminance(x: torch.Tensor) -> torch.Tensor:
    """The Y channel repeated to three channels (what the network sees in luminance mode)."""
    return rgb_to_ycbcr(x)[:, :1].expand(-1, 3, -1, -1).contiguous()


def match_luminance(style_y: torch.Tensor, content_y: torch.Tensor) -> torch.Tensor:
    """Shift and scale the style's luminance to the photo's mean and spread (Gatys 2016, eq. 2)."""
    s_mean, s_std = style_y.mean(), style_y.std().clamp_min(1e-6)
    c_mean, c_std = content_y.mean(), content_y.std()
    return ((style_y - s_mean) * (c_std / s_std) + c_mean).clamp(0, 1)


def with_chroma_of(luma_rgb: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
    """Combine the stylized luminance with the photo's Cb/Cr (resized to match)."""
    ycc = rgb_to_ycbcr(content)
    if ycc.shape[-2:] != luma_rgb.shape[-2:]:
        ycc = torch.nn.functional.interpolate(ycc, size=luma_rgb.shape[-2:], mode="bicubic")
    y = rgb_to_ycbcr(luma_rgb)[:, :1]
    return ycbcr_to_rgb(torch.cat([y, ycc[:, 1:]], 1)).clamp(0, 1)


def _sqrtm(cov: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(cov)
    vals = vals.clamp_min(1e-8)
    power = -0.5 if inverse else 0.5
    return vecs @ torch.diag(vals**power) @ vecs.T


def match_colour_stats(style: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
    """Affine-transform the style's pixels so their mean and covariance equal the photo's
    (the "image analogies" transfer Gatys 2016 uses: A = Sc^1/2 Ss^-1/2)."""
    s = style[0].reshape(3, -1).double()
    c = content[0].reshape(3, -1).double()
    s_mean, c_mean = s.mean(1, keepdim=True), c.mean(1, keepdim=True)
    s_cov = torch.cov(s) + torch.eye(3, dtype=s.dtype) * 1e-5
    c_cov = torch.cov(c) + torch.eye(3, dtype=c.dtype) * 1e-5
    a = _sqrtm(c_cov) @ _sqrtm(s_cov, inverse=True)
    out = a @ (s - s_mean) + c_mean
    return out.reshape(style.shape).to(style.dtype).clamp(0, 1)


class Preservation:
    """One run's colour preservation (``preserve_colors``): ``stats`` recolours the style
    images toward the photo; ``luminance`` optimises luminance only (style targets matched to
    the photo's luminance) and puts the photo's chroma back on the output and previews."""

    def __init__(self, mode: str, photo: torch.Tensor | None) -> None:
        """``photo`` may be None in mode ``none``, which never reads it (a print-size photo's
        tensor is 12 bytes a pixel, held through the whole run)."""
        if photo is None and mode != "none":
            raise ValueError(f"preserve_colors={mode!r} needs the photo")
        self.mode, self._photo = mode, photo
        self.photo_y = luminance(photo) if photo is not None and mode == "luminance" else None

    @property
    def photo(self) -> torch.Tensor:
        assert self._photo is not None  # only the modes that have one read it
        return self._photo

    @property
    def chroma_source(self) -> torch.Tensor | None:
        """The photo whose chroma the output takes (luminance mode), else None."""
        return self.photo if self.photo_y is not None else None

    def style_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """A style image's tensor as the optimisation compares it (stats mode recolours the
        style images earlier, on the images themselves: see ``recolour``)."""
        if self.photo_y is None:
            return t
        return match_luminance(luminance(t), self.photo_y)

    def content_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """The content (and start) image as optimised: its luminance in luminance mode."""
        return luminance(t) if self.photo_y is not None else t

    def recolour(self, style: torch.Tensor) -> torch.Tensor:
        """A style image's tensor with the photo's colour statistics (stats mode)."""
        return match_colour_stats(style, self.photo)

    def finish(self, image: torch.Tensor) -> torch.Tensor:
        """The optimised image as the output's colours: the photo's chroma in luminance mode."""
        return with_chroma_of(image, self.photo) if self.photo_y is not None else image.clamp(0, 1)
