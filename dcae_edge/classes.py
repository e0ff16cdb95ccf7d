"""Class names of class-conditional generators, and turning ids or names into ids (torch-free:
the app runtimes use it). The 1000 ImageNet-1k names ship as a small text file (one line per
class id: its WordNet lemmas, tab-separated; from timm's imagenet_synset_to_lemma.txt)."""
from __future__ import annotations

import re
from pathlib import Path

IMAGENET_FILE = Path(__file__).parent / "assets" / "imagenet_classes.txt"


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names in class-id order (first WordNet lemma of each synset)."""
    path = IMAGENET_FILE
    return [line.split("\t")[0] for line in path.read_text().splitlines()]


def resolve_classes(values, class_names: list[str], num_classes: int) -> list[int]:
    """Class ids from ids or names ("207", "golden retriever", "retriever" when unambiguous)."""
    ids = []
    lemmas = None
    for v in values:
        s = str(v).strip()
        if re.fullmatch(r"-?\d+", s):
            c = int(s)
            if not 0 <= c < num_classes:
                raise ValueError(f"class id {c} is out of range: this model has classes 0..{num_classes - 1}")
            ids.append(c)
            continue
        if lemmas is None:
            lemmas = _class_lemmas(class_names)
        key = s.lower()
        exact = [i for i, names in enumerate(lemmas) if key in names]
        if len(exact) == 1:
            ids.append(exact[0])
            continue
        partial = [i for i, names in enumerate(lemmas) if any(key in n for n in names)]
        if len(partial) == 1:
            ids.append(partial[0])
            continue
        if not exact and not partial:
            raise ValueError(f"no class is called {s!r}" + (f" (classes: {', '.join(class_names[:10])}, ...)" if class_names else ""))
        cands = exact or partial
        raise ValueError(f"{s!r} matches {len(cands)} classes: " + ", ".join(f"{i}={class_names[i]}" for i in cands[:8])
                         + (" ..." if len(cands) > 8 else "") + "; use the id")
    return ids


def _class_lemmas(class_names: list[str]) -> list[set[str]]:
    path = IMAGENET_FILE
    if len(class_names) == 1000 and path.is_file():
        return [{n.strip().lower() for n in line.split("\t")} for line in path.read_text().splitlines()]
    return [{n.lower()} for n in class_names]
