"""Image collections: a folder (recursive) or a file list, optional labels from an ImageFolder
layout, and a Dataset that never stops a run on a corrupt image (it flags it instead)."""
from __future__ import annotations

import errno
import json
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                    ".pgm", ".jfif")


# -- text files ------------------------------------------------------------------------------
def read_text(path: str, option: str) -> str:
    """The text of a UTF-8 file; a file that is not UTF-8 is an error naming the file, the line
    and the option it was given to."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{option} {path}: no such file") from None
    except OSError as e:
        raise ValueError(f"{option} {path}: cannot read it ({e.strerror or e})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ValueError(f"{option} {path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); "
                         "save the file as UTF-8") from None


def read_lines(path: str, option: str) -> List[str]:
    return read_text(path, option).splitlines()


def load_json(path: str, option: str):
    """A JSON file; malformed JSON is an error naming the file, line and column."""
    return parse_json(read_text(path, option), path, option)


def parse_json(text: str, path: str, option: str):
    """``text`` (read from ``path``) as JSON; malformed JSON is an error naming the file, line
    and column."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{option} {path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg})") \
            from None


@dataclass
class ImageSet:
    """An ordered list of image paths, with labels (class indices) when the layout gives them."""
    root: str
    paths: List[str]
    labels: Optional[List[int]] = None
    folder_to_class: Dict[str, int] = field(default_factory=dict)
    missing: List[str] = field(default_factory=list)   # listed in a file list, not on disk
    source: str = ""                    # the folder or the file list given (absolute)
    is_list: bool = False               # ``source`` is a file list
    ignored: List[str] = field(default_factory=list)   # loose files beside the class folders
    repeated: List[str] = field(default_factory=list)  # links to a file listed before: left out
    note: str = ""                      # why the images are unlabeled, when it is not obvious

    def __len__(self) -> int:
        return len(self.paths)

    def describe(self) -> str:
        """Where the images come from, in words: 'under FOLDER' or 'listed in FILE'."""
        where = self.source or self.root
        return f"listed in {where}" if self.is_list else f"under {where}"


def is_image(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def _walk(root: str, repeated: Optional[List[str]] = None) -> List[str]:
    """Images under ``root``, recursively (folders and files in name order, each folder before
    its subfolders), following links to folders but entering each real folder once (a link back
    up the tree would list the same images again, under other class folders); a folder that is
    also under ``root`` without a link is listed there. An image file reached more than once
    (a link to a file of the tree) is listed once, the rest of its paths added to ``repeated``:
    it would otherwise count twice in the fit. The path kept is the file's own where the walk
    meets it (its folder labels it; a link elsewhere, e.g. a preview at the top level, is the
    one left out), else the first link in walk order; dangling links are each kept (opening
    them names them). Only links cost a system call beyond the folder listings (a million
    files are not each stat-ed)."""
    direct = None           # the folders reachable without links: listed only once a link shows
    found, seen = [], set()
    keys = []               # per path in ``found``: (the real file, reached by a link)
    stack = [root]
    while stack:
        d = stack.pop()
        real = os.path.realpath(d)
        if real in seen:
            continue
        seen.add(real)
        try:
            with os.scandir(d) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:     # unreadable folder: skipped, as os.walk skips it
            continue
        keep, files = [], []
        for e in entries:
            try:
                is_dir = e.is_dir()                 # follows a link (one stat, links only)
            except OSError:
                is_dir = False
            if not is_dir:
                files.append(e)
                continue
            sub = os.path.join(d, e.name)
            target = os.path.realpath(sub)
            if target in seen:
                continue
            if e.is_symlink():
                if direct is None:
                    direct = {os.path.realpath(r) for r, _, _ in os.walk(root)}
                if target in direct:
                    continue
            keep.append(sub)
        stack.extend(reversed(keep))
        for e in files:
            if not is_image(e.name):
                continue
            path = os.path.join(d, e.name)
            link = e.is_symlink()
            key = os.path.realpath(path) if link else os.path.join(real, e.name)
            if link and not os.path.exists(key):
                key = ("dangling", path)
            found.append(path)
            keys.append((key, link))
    chosen = {}             # real file -> index of the path kept
    for i, (key, link) in enumerate(keys):
        j = chosen.get(key)
        if j is None or (keys[j][1] and not link):
            chosen[key] = i
    kept = set(chosen.values())
    if repeated is not None:
        repeated.extend(p for i, p in enumerate(found) if i not in kept)
    return [p for i, p in enumerate(found) if i in kept]


def strip_comment(line: str) -> str:
    """A line of a labels or weights file without its comment: a line whose first character
    (after spaces) is '#', or the rest of a line from a '#' that follows a space or a tab (a '#'
    inside a file name, 'photo#1.jpg', is kept)."""
    line = line.strip()
    if line.startswith("#"):
        return ""
    return re.split(r"\s#", line, maxsplit=1)[0].strip()


def norm_name(name: str) -> str:
    """A class or folder name as matching sees it: case, '_' and '-' ignored."""
    return name.strip().lower().replace("_", " ").replace("-", " ")


def match_folders(folders: Sequence[str], classnames: Sequence[str],
                  folder_map: Optional[Dict[str, str]] = None) -> Dict[str, int]:
    """Class index of every folder name: through ``folder_map`` (folder -> class name, e.g.
    ImageNet wnids) when given, else by name (case, '_' and '-' ignored). Raises listing every
    folder that matches no class."""
    by_name = {}
    for i, c in enumerate(classnames):
        by_name.setdefault(norm_name(c), i)
    out, unmatched = {}, []
    for f in folders:
        name = folder_map.get(f, f) if folder_map else f
        idx = by_name.get(norm_name(name))
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
    match a class; loose files at the top level are left out and named in ``ignored``, for the
    caller to warn about), "none", or "auto" (folder labels when at least one first-level folder
    name is a class name and fewer images lie loose at the top level than in folders; an error
    when every image lies in one of several folders and none matches a class: say "none" for
    unlabeled images; otherwise none, with ``note`` saying why when class folders were found).
    """
    if labels not in ("auto", "folder", "none"):
        raise ValueError(f"labels must be 'auto', 'folder' or 'none', got {labels!r}")
    is_list = False
    repeated: List[str] = []
    if os.path.isdir(images):
        root = os.path.abspath(images)
        paths = _walk(root, repeated)
    elif os.path.isfile(images) and images.lower().endswith(IMAGE_EXTENSIONS):
        paths = [os.path.abspath(images)]          # one image: a set of one
        root = os.path.dirname(paths[0])
        if labels == "auto":
            labels = "none"
    elif os.path.isfile(images):
        is_list = True
        base = os.path.dirname(os.path.abspath(images))
        numbered = [(n, ln.strip()) for n, ln in enumerate(read_lines(images, "--images"), 1)]
        numbered = [(n, ln) for n, ln in numbered if ln and not ln.startswith("#")]
        lines = [ln for _, ln in numbered]
        paths = [p if os.path.isabs(p) else os.path.join(base, p) for p in lines]
        first: Dict[str, int] = {}
        for i, p in enumerate(paths):     # one file under two spellings is a repeat too
            key = os.path.realpath(p)
            if first.setdefault(key, i) != i:
                raise ValueError(f"--images {images}: {lines[i]!r} is listed twice (lines "
                                 f"{numbered[first[key]][0]} and {numbered[i][0]}); list each "
                                 "image once, or it counts twice in the fit")
        # the files are opened as listed (the OS resolves '..' through links); the folder
        # layout that labels them is read from the paths as written, '..' folded
        root = os.path.commonpath([os.path.normpath(p) for p in paths]) if paths else base
        if labels == "folder" and paths and all(
                os.path.dirname(os.path.normpath(p)) == root for p in paths):
            root = os.path.dirname(root)           # the images of one class folder
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
    source = os.path.abspath(images)
    rel = [os.path.relpath(os.path.normpath(p), root) for p in paths]
    top = [r.split(os.sep)[0] if os.sep in r else None for r in rel]
    loose = [p for p, t in zip(paths, top) if t is None]
    nested = len(paths) - len(loose)
    note = ""
    if labels == "auto":
        folders = sorted({t for t in top if t is not None})
        names = {norm_name(c) for c in (classnames or [])}
        hits = [f for f in folders if norm_name((folder_map or {}).get(f, f)) in names]
        if classnames and not loose and len(folders) >= 2 and not hits:
            raise ValueError(
                f"--images {images!r} has an ImageFolder layout ({len(folders)} folders: "
                f"{folders[:5]}{' ...' if len(folders) > 5 else ''}) but no folder matches a "
                f"class name (classes: {list(classnames)[:5]}"
                f"{' ...' if len(classnames) > 5 else ''}); pass --labels none for unlabeled "
                "images, or a JSON object folder -> class name as --classes")
        # class folders with a few stray files beside them: the folders still label the images
        # (the stray files are left out, with a warning); mostly loose files: unlabeled, saying so
        if classnames and hits and len(loose) < nested:
            labels = "folder"
        else:
            labels = "none"
            if classnames and hits:
                note = (f"{len(loose)} of the {len(paths)} images lie outside the class folders "
                        f"(e.g. {os.path.basename(loose[0])}), so folder names are not used as "
                        "labels; pass --labels folder to use them (leaving the loose files out)")
    if labels == "none":
        return ImageSet(root, paths, missing=missing, source=source, is_list=is_list, note=note,
                        repeated=repeated)
    if classnames is None:
        raise ValueError("folder labels need the class names")
    if loose:
        if not nested:
            raise ValueError(f"folder labels: images must lie in class folders, found only "
                             f"loose files at the top level of {root}")
        keep = [t is not None for t in top]
        paths = [p for p, k in zip(paths, keep) if k]
        top = [t for t, k in zip(top, keep) if k]
        loose_set = set(loose)
        missing = [p for p in missing if p not in loose_set]
    mapping = match_folders(sorted(set(top)), classnames, folder_map)
    return ImageSet(root, paths, [mapping[t] for t in top], mapping, missing, source=source,
                    is_list=is_list, ignored=loose, repeated=repeated)


# Read errors that say nothing about the file (too many open files, an I/O or network-disk
# error, no memory, a timeout): the image is tried again in a later run, not recorded as broken.
PASSING_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.EIO, errno.EAGAIN, errno.ENOMEM,
                            errno.ETIMEDOUT, errno.ESTALE, errno.EINTR, errno.EBUSY})
READ, BROKEN, PASSING = 1, 0, -1       # ImageDataset's read status of an image


def read_status(error: BaseException) -> int:
    """BROKEN for a file that cannot be decoded, PASSING for a failure of the moment."""
    if isinstance(error, MemoryError) or (isinstance(error, OSError)
                                          and error.errno in PASSING_ERRNOS):
        return PASSING
    return BROKEN


class ImageDataset(torch.utils.data.Dataset):
    """Loads and preprocesses images; a file that cannot be read yields a zero image and its
    read status (BROKEN, or PASSING for a failure of the moment) instead of an exception, so one
    bad file never stops an extraction. Items: (image, index, status), status READ when read."""

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
            return x, idx, READ
        except Exception as e:  # corrupt, truncated, unreadable: counted and reported by the caller
            if self._shape is None:
                from PIL import Image as _I

                self._shape = self.preprocess(_I.new("RGB", (8, 8))).shape
            return torch.zeros(self._shape), idx, read_status(e)
