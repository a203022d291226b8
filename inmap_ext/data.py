"""Image collections: a folder (recursive) or a file list, optional labels from an ImageFolder
layout, and a Dataset that never stops a run on a corrupt image (it flags it instead)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                    ".pgm", ".jfif")


@dataclass
class ImageSet:
    """An ordered list of image paths, with labels (class indices) when the layout gives them."""
    root: str
    paths: List[str]
    labels: Optional[List[int]] = None
    folder_to_class: Dict[str, int] = field(default_factory=dict)
    missing: List[str] = field(default_factory=list)   # listed in a file list, not on disk

    def __len__(self) -> int:
        return len(self.paths)


def is_image(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def _walk(root: str) -> List[str]:
    found = []
    for d, dirs, files in os.walk(root, followlinks=True):
        dirs.sort()
        found.extend(os.path.join(d, f) for f in sorted(files) if is_image(f))
    return found


def _norm(name: str) -> str:
    return name.strip().lower().replace("_", " ").replace("-", " ")


def match_folders(folders: Sequence[str], classnames: Sequence[str],
                  folder_map: Optional[Dict[str, str]] = None) -> Dict[str, int]:
    """Class index of every folder name: through ``folder_map`` (folder -> class name, e.g.
    ImageNet wnids) when given, else by name (case, '_' and '-' ignored). Raises listing every
    folder that matches no class."""
    by_name = {}
    for i, c in enumerate(classnames):
        by_name.setdefault(_norm(c), i)
    out, unmatched = {}, []
    for f in folders:
        name = folder_map.get(f, f) if folder_map else f
        idx = by_name.get(_norm(name))
        if idx is None:
            unmatched.append(f)
        else:
            out[f] = idx
    if unmatched:
        shown = ", ".join(repr(u) for u in unmatched[:10])
        more = f" and {len(unmatched) - 10} more" if len(unmatched) > 10 else ""
        raise ValueError(
            f"{len(unmatched)} image folder(s) match no class name: {shown}{more}. Folder names "
            "must equal class names (case, '_' and '-' are ignored), or pass the classes as a "
            "JSON object mapping folder name -> class name")
    return out


def list_images(images: str, classnames: Optional[Sequence[str]] = None, labels: str = "auto",
                folder_map: Optional[Dict[str, str]] = None) -> ImageSet:
    """Collect the images of ``images`` (a folder, searched recursively, or a text file with one
    path per line, relative paths taken from the file's folder).

    labels: "folder" (ImageFolder layout: the first-level folder is the class; every folder must
    match a class), "none", or "auto" (folder labels when every image lies in a first-level
    folder and at least one folder name is a class name; an error when there are several such
    folders and none matches a class: say "none" for unlabeled images; otherwise none).
    """
    if labels not in ("auto", "folder", "none"):
        raise ValueError(f"labels must be 'auto', 'folder' or 'none', got {labels!r}")
    if os.path.isdir(images):
        root = os.path.abspath(images)
        paths = _walk(root)
    elif os.path.isfile(images):
        base = os.path.dirname(os.path.abspath(images))
        with open(images) as f:
            lines = [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]
        paths = [p if os.path.isabs(p) else os.path.join(base, p) for p in lines]
        root = os.path.commonpath(paths) if paths else base
        if labels == "auto":
            labels = "none"
    else:
        raise FileNotFoundError(f"--images: {images!r} is neither a folder nor a file list")
    if not paths:
        raise ValueError(f"--images: no images found under {images!r} "
                         f"(extensions: {', '.join(IMAGE_EXTENSIONS)})")
    missing = [p for p in paths if not os.path.isfile(p)] if not os.path.isdir(images) else []
    if len(missing) == len(paths):
        raise FileNotFoundError(f"--images {images!r}: none of the {len(paths)} listed paths "
                                f"exists (first: {paths[0]!r})")
    rel = [os.path.relpath(p, root) for p in paths]
    top = [r.split(os.sep)[0] if os.sep in r else None for r in rel]
    if labels == "auto":
        folders = sorted({t for t in top if t is not None})
        nested_everywhere = all(t is not None for t in top)
        names = {_norm(c) for c in (classnames or [])}
        hits = [f for f in folders if _norm((folder_map or {}).get(f, f)) in names]
        if classnames and nested_everywhere and len(folders) >= 2 and not hits:
            raise ValueError(
                f"--images {images!r} has an ImageFolder layout ({len(folders)} folders: "
                f"{folders[:5]}{' ...' if len(folders) > 5 else ''}) but no folder matches a "
                f"class name (classes: {list(classnames)[:5]}"
                f"{' ...' if len(classnames) > 5 else ''}); pass --labels none for unlabeled "
                "images, or a JSON object folder -> class name as --classes")
        labels = "folder" if (classnames and nested_everywhere and hits) else "none"
    if labels == "none":
        return ImageSet(root, paths, missing=missing)
    if classnames is None:
        raise ValueError("folder labels need the class names")
    if any(t is None for t in top):
        loose = [r for r, t in zip(rel, top) if t is None][:3]
        raise ValueError(f"folder labels: images must lie in class folders, found loose files "
                         f"at the top level: {loose}")
    mapping = match_folders(sorted(set(top)), classnames, folder_map)
    return ImageSet(root, paths, [mapping[t] for t in top], mapping, missing)


class ImageDataset(torch.utils.data.Dataset):
    """Loads and preprocesses images; a file that cannot be read yields a zero image and
    ok=False instead of an exception, so one bad file never stops an extraction."""

    def __init__(self, paths: Sequence[str], preprocess, indices: Optional[Sequence[int]] = None):
        self.paths = list(paths)
        self.preprocess = preprocess
        self.indices = list(range(len(self.paths))) if indices is None else list(indices)
        self._shape = None

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        from PIL import Image

        idx = self.indices[i]
        try:
            with Image.open(self.paths[idx]) as im:
                x = self.preprocess(im.convert("RGB"))
            return x, idx, True
        except Exception:  # corrupt, truncated, unreadable: counted and reported by the caller
            if self._shape is None:
                from PIL import Image as _I

                self._shape = self.preprocess(_I.new("RGB", (8, 8))).shape
            return torch.zeros(self._shape), idx, False
