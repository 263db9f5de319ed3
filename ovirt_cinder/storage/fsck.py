"""Check a pool's domains, and repair what is safe to repair.

What is reported (``Problem.kind``):

``unfinished-flow``   an operation that did not finish (crash, kill)
``bad-metadata``      domain metadata with a wrong checksum or bad syntax,
                      volume metadata that does not parse; never written
                      over, never repaired
``broken-chain``      loops, missing parents, foreign non-SHARED parents,
                      an image without exactly one legal leaf
``illegal-volume``    an ILLEGAL volume (work in progress that died)
``orphan``            volume data, lease or metadata without the rest
``leftover``          hidden work-in-progress names: ``.tmp-*`` (images or
                      domains being built), ``_remove_me_*`` (images being
                      removed), ``*.new`` (metadata being written)

Repair first finishes or reverts unfinished flows (the persisted logbook
knows how), then removes only *garbage*: leftovers, orphans that hold no
legal metadata, and ILLEGAL volumes that nothing depends on. Legal data is
never touched; anything else is reported and left for a human.
"""

from __future__ import annotations

import dataclasses
import os

from ovirt_cinder.storage import constants as sc
from ovirt_cinder.storage import errors
from ovirt_cinder.storage import fileutil
from ovirt_cinder.storage import image
from ovirt_cinder.storage import sdmeta

__all__ = ["Problem", "Report", "check", "repair"]


@dataclasses.dataclass(frozen=True)
class Problem:
    kind: str
    sd_id: str
    path: str
    detail: str
    img_id: str | None = None
    vol_id: str | None = None
    garbage: bool = False

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Report:
    problems: list[Problem]
    repaired: list[Problem] = dataclasses.field(default_factory=list)
    recovered: list[tuple[str, str]] = dataclasses.field(
        default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, object]:
        return {
            "clean": self.clean,
            "problems": [p.as_dict() for p in self.problems],
            "repaired": [p.as_dict() for p in self.repaired],
            "recovered": [list(r) for r in self.recovered],
        }


def check(pool) -> Report:
    """Report every problem in the pool; change nothing."""
    problems = [Problem(kind="unfinished-flow", sd_id=pool.master.sd_id,
                        path=p.book_id, detail=p.problem or p.name)
                for p in pool.runner.unfinished()]
    for dom in pool.domains.values():
        problems.extend(_check_domain(dom))
    return Report(problems=problems)


def repair(pool) -> Report:
    """Recover flows, remove garbage, and report what is left."""
    recovered = pool.recover()
    repaired = []
    for problem in check(pool).problems:
        if problem.garbage:
            dom = pool.domain(problem.sd_id)
            with pool.lease_manager.domain_lease(dom):
                _remove_garbage(dom, problem)
            repaired.append(problem)
    report = check(pool)
    report.repaired = repaired
    report.recovered = recovered
    return report


def _check_domain(dom) -> list[Problem]:
    problems = _check_domain_metadata(dom)
    problems.extend(_check_leftovers(dom))
    for img_id in dom.list_images():
        problems.extend(_check_image(dom, img_id))
    return problems


def _check_domain_metadata(dom) -> list[Problem]:
    path = dom.dom_md(sc.METADATA)
    try:
        with open(path, "rb") as f:
            sdmeta.parse(f.read(), path)
    except (errors.MetadataError, OSError) as e:
        return [Problem(kind="bad-metadata", sd_id=dom.sd_id, path=path,
                        detail=str(e))]
    return []


def _check_leftovers(dom) -> list[Problem]:
    found = []
    dirs = [dom.images_dir, os.path.join(dom.path, sc.DOM_MD)]
    for directory in dirs:
        for name in sorted(os.listdir(directory)):
            if name.startswith((sc.TEMP_PREFIX, sc.REMOVE_PREFIX)) or \
                    name.endswith(sc.NEW_EXT):
                found.append(_leftover(dom, os.path.join(directory, name)))
    for img_id in dom.list_images():
        directory = dom.image_dir(img_id)
        for name in sorted(os.listdir(directory)):
            if name.endswith(sc.NEW_EXT) or name.startswith(sc.TEMP_PREFIX):
                found.append(_leftover(dom, os.path.join(directory, name),
                                       img_id))
    mount = dom.mount
    for name in sorted(os.listdir(mount)):
        if name.startswith(sc.TEMP_PREFIX + dom.sd_id):
            found.append(_leftover(dom, os.path.join(mount, name)))
    return found


def _leftover(dom, path: str, img_id: str | None = None) -> Problem:
    return Problem(kind="leftover", sd_id=dom.sd_id, path=path,
                   img_id=img_id, detail="interrupted work", garbage=True)


def _check_image(dom, img_id: str) -> list[Problem]:
    directory = dom.image_dir(img_id)
    problems = _check_files(dom, img_id, directory)
    bad = {p.vol_id for p in problems}
    volumes = {}
    for vol_id in dom.list_volumes(img_id):
        if vol_id in bad:
            continue
        try:
            meta = dom.read_volume_meta(img_id, vol_id)
        except errors.MetadataError as e:
            problems.append(Problem(
                kind="bad-metadata", sd_id=dom.sd_id, img_id=img_id,
                vol_id=vol_id, path=dom.volume_path(img_id, vol_id),
                detail=str(e)))
            continue
        volumes[vol_id] = image.Volume(
            vol_id=vol_id, path=dom.volume_path(img_id, vol_id), meta=meta)
    tree = image.ImageTree(dom.sd_id, img_id, volumes)
    problems.extend(_check_illegal(dom, tree))
    if not any(p.kind == "illegal-volume" for p in problems):
        problems.extend(
            Problem(kind="broken-chain", sd_id=dom.sd_id, img_id=img_id,
                    path=directory, detail=str(e)) for e in tree.check())
    return problems


def _check_files(dom, img_id: str, directory: str) -> list[Problem]:
    """Data, lease and metadata must come together."""
    names = set(os.listdir(directory))
    vol_ids = {n.split(".", 1)[0] for n in names
               if not n.startswith(sc.TEMP_PREFIX)
               and not n.endswith(sc.NEW_EXT)}
    problems = []
    for vol_id in sorted(vol_ids):
        have = {ext for ext in ("", sc.META_EXT, sc.LEASE_EXT)
                if vol_id + ext in names}
        if have == {"", sc.META_EXT, sc.LEASE_EXT}:
            continue
        meta_legal = sc.META_EXT in have and _is_legal(
            dom, img_id, vol_id)
        problems.append(Problem(
            kind="orphan", sd_id=dom.sd_id, img_id=img_id, vol_id=vol_id,
            path=os.path.join(directory, vol_id),
            detail="has only " + (", ".join(
                sorted(e or "data" for e in have)) or "nothing"),
            garbage=not meta_legal))
    return problems


def _is_legal(dom, img_id: str, vol_id: str) -> bool:
    try:
        meta = dom.read_volume_meta(img_id, vol_id)
    except errors.MetadataError:
        return True     # unknown: treat as data, never remove
    return meta.legality != sc.Legality.ILLEGAL


def _check_illegal(dom, tree: image.ImageTree) -> list[Problem]:
    problems = []
    for vol in tree.volumes.values():
        if vol.meta.legality == sc.Legality.ILLEGAL:
            problems.append(Problem(
                kind="illegal-volume", sd_id=dom.sd_id, img_id=tree.img_id,
                vol_id=vol.vol_id, path=vol.path,
                detail="ILLEGAL volume",
                garbage=not tree.children(vol.vol_id)))
    return problems


def _remove_garbage(dom, problem: Problem) -> None:
    path = problem.path
    if problem.vol_id:
        for ext in ("", sc.LEASE_EXT, sc.META_EXT + sc.NEW_EXT,
                    sc.META_EXT):
            fileutil.remove_file(path + ext)
    elif os.path.isdir(path):
        fileutil.remove_tree(path)
    else:
        fileutil.remove_file(path)
