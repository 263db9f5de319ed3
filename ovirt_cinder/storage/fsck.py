"""Check a pool's domains, and repair what is safe to repair.

What is reported (``Problem.kind``):

``unfinished-flow``   an operation that did not finish (crash, kill), a
                      torn or untrusted logbook, or a logbook of an earlier
                      release in ``master/tasks/books``
``bad-metadata``      a domain that could not be opened (``pool.broken``),
                      domain metadata with a wrong checksum or bad syntax,
                      volume metadata that does not parse; never written
                      over, never repaired
``broken-chain``      loops, missing parents, foreign non-SHARED parents,
                      qcow2 backing names that are not the parent's volume
                      id (or point outside the image), format mismatches,
                      missing data, an image without exactly one legal leaf
``illegal-volume``    an ILLEGAL volume (work in progress that died)
``orphan``            volume data, lease or metadata without the rest
``stray``             a name in ``images/`` or an image directory that is
                      none of ours; never touched
``leftover``          hidden work-in-progress names: ``.tmp-*`` (images or
                      domains being built, uploads being staged),
                      ``_remove_me_*`` (images being removed), ``*.new``
                      (metadata being written)
``counters``          a V5 domain's counters (:mod:`counters`) missing,
                      damaged, or other than a scan of its images finds;
                      repair rewrites them from a scan under the domain
                      lease

Every problem says whether repair would act on it: ``garbage`` (repair
removes it) or ``quarantine`` (repair moves it aside, see below); anything
else is left for a human.

Garbage is only what is proven garbage:

- nothing of an image that an unfinished flow names (the flow planned with
  it; ``recover`` finishes it), and nothing at all in a domain that a flow
  of unknown scope may touch (an earlier release's logbook, a book without
  images) or whose metadata is bad; no volume of an image whose volume
  metadata cannot all be read (it may name anything as its parent);
- leftovers: ``images/.tmp-<img>`` and ``images/_remove_me_<img>``, and
  ``*.new`` in an image directory (volume metadata is written only under
  the domain lease, which repair holds); other ``.tmp-*`` and ``*.new``
  names only once unchanged for :data:`MIN_AGE` seconds, upload staging
  files next to the domain (``<mount>/.tmp-<sd_id>-*``) once unchanged for
  :data:`STAGING_MIN_AGE` seconds and named by no unfinished flow;
- orphans that hold no data: a lone ``.lease`` and/or ``.meta.new``, and
  ILLEGAL metadata whose data file is gone and that nothing names as its
  parent or backing file;
- an ILLEGAL childless LEAF with data (a half-made snapshot or revert
  layer) only when the rest of the image is whole without it: one legal
  leaf, every chain complete and consistent, every volume's metadata
  readable. An ILLEGAL leaf that is the image's only leaf (a failed
  extend) holds the volume's data: it is never removed.

Data is never deleted otherwise. A data file whose ``.meta`` is missing is
left where it is while anything names it (a volume's ``PUUID`` or qcow2
backing file) or while its image is not whole; only an unnamed one in an
otherwise whole image is *quarantined*: moved, with its lease, to
``<sd>/.quarantine/<UTC timestamp>/<img>/`` (the domain directory, outside
``images/``, where no reader and no oVirt host looks), for a human to
inspect and remove.

Repair first finishes or reverts unfinished flows (``pool.recover``) and
sweeps the logbook's stale temporary files. What it removes or moves
from an image directory is counted in the domain's counters; counters
found off are rewritten last. Then, for each finding it may
act on, it takes the image's lease (the one every operation on the image
holds for its whole run) and the domain lease, checks the finding again
under them (metadata re-read, the image not busy now, the domain metadata
still good), and only then removes or moves it. A finding whose lease
cannot be had within the lease timeout is left and reported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import os
import time
from collections.abc import Iterable
from typing import Any

from ovirt_cinder.storage import constants as sc
from ovirt_cinder.storage import counters
from ovirt_cinder.storage import errors
from ovirt_cinder.storage import fileutil
from ovirt_cinder.storage import image
from ovirt_cinder.storage import logbook
from ovirt_cinder.storage import qcow2
from ovirt_cinder.storage import sd
from ovirt_cinder.storage import validate

__all__ = ["Problem", "Report", "check", "repair", "QUARANTINE",
           "MIN_AGE", "STAGING_MIN_AGE", "LOGBOOK_MIN_AGE"]

LOG = logging.getLogger(__name__)

# Where repair moves data it must not delete: <sd>/.quarantine/<stamp>/.
QUARANTINE = ".quarantine"
# Leftovers that no lease fences count as garbage only once unchanged for
# this long (seconds).
MIN_AGE = 60.0
# Upload staging files next to a domain: an upload or its inspection may
# pause for a long time.
STAGING_MIN_AGE = 3600.0
# Passed to logbook.sweep.
LOGBOOK_MIN_AGE = 3600.0
# The logbook of releases before the ovirt-cinder/flows one.
LEGACY_BOOKS = os.path.join("tasks", "books")

_REMOVE = "remove"
_QUARANTINE = "quarantine"


@dataclasses.dataclass(frozen=True)
class Problem:
    kind: str
    sd_id: str
    path: str
    detail: str
    img_id: str | None = None
    vol_id: str | None = None
    garbage: bool = False
    quarantine: bool = False

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Report:
    problems: list[Problem]
    repaired: list[Problem] = dataclasses.field(default_factory=list)
    recovered: list[tuple[str, str]] = dataclasses.field(
        default_factory=list)
    quarantined: list[Problem] = dataclasses.field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, object]:
        return {
            "clean": self.clean,
            "problems": [p.as_dict() for p in self.problems],
            "repaired": [p.as_dict() for p in self.repaired],
            "recovered": [list(r) for r in self.recovered],
            "quarantined": [p.as_dict() for p in self.quarantined],
        }


# What fsck needs to know about unfinished work


@dataclasses.dataclass
class _Work:
    """What unfinished flows keep out of garbage decisions."""

    busy: set[tuple[str, str]] = dataclasses.field(default_factory=set)
    held: set[str] = dataclasses.field(default_factory=set)
    hold_all: str | None = None
    in_use: set[str] = dataclasses.field(default_factory=set)

    def blocker(self, sd_id: str, img_id: str | None = None) -> str | None:
        """Why nothing of ``img_id`` (or of the domain) is garbage."""
        if self.hold_all:
            return self.hold_all
        if sd_id in self.held:
            return "a flow of unknown images names this domain"
        if img_id is not None and (sd_id, img_id) in self.busy:
            return "an unfinished flow holds the image"
        return None


def _pending(pool) -> list[Any]:
    return list(pool.runner.unfinished())


def _work(pool, pendings: Iterable[Any],
          legacy: dict[str, Any] | None = None) -> _Work:
    work = _Work()
    for p in pendings:
        work.busy.update((s, i) for s, i in p.images)
        if not p.images:
            if p.domains:
                work.held.update(p.domains)
            else:
                work.hold_all = (f"unfinished flow {p.book_id} names no "
                                 "images")
        kwargs = p.meta.get("kwargs") if isinstance(p.meta, dict) else None
        for key in ("src", "dst"):
            value = kwargs.get(key) if isinstance(kwargs, dict) else None
            if isinstance(value, str):
                work.in_use.add(os.path.abspath(value))
    if legacy:
        if legacy["domains"] is None:
            work.hold_all = "a logbook of an earlier release is not empty"
        else:
            work.held.update(legacy["domains"])
    return work


def _legacy_books(pool) -> dict[str, Any] | None:
    """The earlier release's logbook, if it holds anything: its path,
    book count and the domains its books name (None: unknown)."""
    path = os.path.join(pool.master.master_dir, LEGACY_BOOKS)
    try:
        names = sorted(os.listdir(path))
    except FileNotFoundError:
        return None
    except OSError as e:
        return {"path": path, "count": 0, "domains": None,
                "error": e.strerror}
    # As that release listed them: a book is a directory with metadata.
    names = [n for n in names
             if os.path.lexists(os.path.join(path, n, "metadata"))]
    if not names:
        return None
    domains: set[str] | None = set()
    for name in names:
        try:
            with open(os.path.join(path, name, "metadata")) as f:
                meta = json.load(f).get("meta") or {}
            domains |= {validate.check_uuid(d) for d in meta["domains"]}
        except (OSError, ValueError, KeyError, TypeError, AttributeError,
                errors.StorageError):
            domains = None
            break
    return {"path": path, "count": len(names), "domains": domains,
            "error": None}


# Checking


@dataclasses.dataclass(frozen=True)
class _Finding:
    problem: Problem
    scope: str | None = None        # the image scanned; None: the domain
    lease_img: str | None = None    # the image lease repair takes

    @property
    def key(self) -> tuple[str, str, str | None]:
        p = self.problem
        return (p.kind, p.path, p.vol_id)

    @property
    def action(self) -> str | None:
        if self.problem.garbage:
            return _REMOVE
        if self.problem.quarantine:
            return _QUARANTINE
        return None


def check(pool) -> Report:
    """Report every problem in the pool; change nothing (but reading the
    logbook sets a torn book aside, see FlowRunner.load)."""
    return Report(problems=[f.problem for f in _check(pool)])


def _check(pool) -> list[_Finding]:
    found = []
    pendings = _pending(pool)
    master = pool.master.sd_id
    for p in pendings:
        detail = p.name if not p.problem else f"{p.name}: {p.problem}"
        images = ", ".join(f"{s}/{i}" for s, i in p.images)
        if images:
            detail += f" (images {images})"
        found.append(_Finding(Problem(
            kind="unfinished-flow", sd_id=master, path=p.book_id,
            detail=detail)))
    legacy = _legacy_books(pool)
    if legacy:
        detail = (f"{legacy['count']} logbook(s) written by an earlier "
                  "release; run its recover first")
        if legacy["error"]:
            detail = f"unreadable logbook of an earlier release: " \
                     f"{legacy['error']}"
        found.append(_Finding(Problem(
            kind="unfinished-flow", sd_id=master, path=legacy["path"],
            detail=detail)))
    for path, error in sorted(pool.broken.items()):
        found.append(_Finding(Problem(
            kind="bad-metadata", sd_id=os.path.basename(path), path=path,
            detail=f"domain not opened: {error}")))
    work = _work(pool, pendings, legacy)
    for dom in pool.domains.values():
        found.extend(_check_domain(dom, work))
    return found


def _check_domain(dom, work: _Work) -> list[_Finding]:
    """Findings of one domain; never raises for what it finds there."""
    found = []
    frozen = _domain_metadata_problem(dom)
    if frozen is not None:
        found.append(_Finding(frozen))
    blocker = ("the domain metadata is bad" if frozen is not None
               else work.blocker(dom.sd_id))
    try:
        found.extend(_scan_domain(dom, work, blocker))
        images = _image_dirs(dom)
    except (OSError, errors.StorageError) as e:
        return found + [_Finding(_unreadable(dom, dom.path, e))]
    for img_id in images:
        try:
            found.extend(_scan_image(dom, img_id, work, blocker))
        except (OSError, errors.StorageError) as e:
            found.append(_Finding(_unreadable(dom, dom.image_dir(img_id),
                                              e, img_id)))
    if frozen is None:
        try:
            problem = _counters_problem(dom)
        except (OSError, errors.StorageError) as e:
            LOG.warning("Counters of domain %s not checked: %s",
                        dom.sd_id, e)
            problem = None
        if problem is not None:
            found.append(_Finding(problem))
    return found


def _counters_problem(dom, tries: int = 4) -> Problem | None:
    """The domain's counters record against a scan of its images.

    Without a lease, operations may change both meanwhile: the record is
    read before and after each scan, and a difference is reported only
    when two scans in a row find the same one under an unchanged record.
    A V3 or V4 domain has none (it gets them when upgraded).
    """
    if dom.metadata.version < sc.DOMAIN_VERSION:
        return None
    path = dom.dom_md(sc.COUNTERS)
    seen = None
    for _ in range(tries):
        try:
            before = counters.read(dom)
        except errors.BadCounters as e:
            return Problem(kind="counters", sd_id=dom.sd_id, path=path,
                           detail=f"{e.reason}; repair rebuilds them by a "
                           "scan", garbage=True)
        scanned = counters.scan(dom)
        try:
            after = counters.read(dom)
        except errors.BadCounters:
            after = None
        if after != before:
            seen = None         # written during the scan: again
            continue
        if before.counters == scanned:
            return None
        if seen == (before, scanned):
            return Problem(
                kind="counters", sd_id=dom.sd_id, path=path,
                detail=f"the record holds {_describe(before.counters)}, "
                f"the images {_describe(scanned)}; repair rewrites it",
                garbage=True)
        seen = (before, scanned)
    return None                 # ever changing: operations are running


def _describe(c: counters.Counters) -> str:
    return (f"{c.images} images, {c.volumes} volumes, {c.provisioned} "
            "bytes provisioned")


def _unreadable(dom, path: str, e: Exception,
                img_id: str | None = None) -> Problem:
    return Problem(kind="bad-metadata", sd_id=dom.sd_id, path=path,
                   img_id=img_id, detail=f"cannot be read: {e}")


def _domain_metadata_problem(dom) -> Problem | None:
    """The domain's metadata as on disk now (it may have changed since
    the pool opened it)."""
    path = dom.dom_md(sc.METADATA)
    try:
        md = sd.FileDomain.open(dom.path).metadata
    except errors.StorageError as e:
        return Problem(kind="bad-metadata", sd_id=dom.sd_id, path=path,
                       detail=str(e))
    except OSError as e:
        return Problem(kind="bad-metadata", sd_id=dom.sd_id, path=path,
                       detail=f"cannot be read: {e.strerror}")
    if md.pool_id != dom.pool_id:
        return Problem(kind="bad-metadata", sd_id=dom.sd_id, path=path,
                       detail=f"now names pool {md.pool_id}, not "
                       f"{dom.pool_id}")
    return None


def _image_dirs(dom) -> list[str]:
    paths = {n: os.path.join(dom.images_dir, n) for n in dom.list_images()}
    return [n for n, p in paths.items()
            if os.path.isdir(p) and not os.path.islink(p)]


def _age(path: str) -> float:
    """Seconds since ``path`` (or, for a directory, anything directly in
    it) last changed; 0 if it is gone."""
    try:
        newest = os.lstat(path).st_mtime
        if os.path.isdir(path) and not os.path.islink(path):
            for entry in os.scandir(path):
                with contextlib.suppress(FileNotFoundError):
                    newest = max(newest,
                                 entry.stat(follow_symlinks=False).st_mtime)
    except FileNotFoundError:
        return 0.0
    return time.time() - newest


def _leftover(dom, path: str, blocker: str | None, *,
              img_id: str | None = None, lease_img: str | None = None,
              scope: str | None = None, min_age: float = 0.0,
              in_use: bool = False) -> _Finding:
    detail = "interrupted work"
    if blocker is None and in_use:
        blocker = "named by an unfinished flow"
    if blocker is None and min_age and _age(path) < min_age:
        blocker = f"changed less than {min_age:g} seconds ago: in use?"
    if blocker is not None:
        detail += f"; kept: {blocker}"
    return _Finding(Problem(kind="leftover", sd_id=dom.sd_id, path=path,
                            img_id=img_id, detail=detail,
                            garbage=blocker is None),
                    scope=scope, lease_img=lease_img)


def _stray(dom, path: str, img_id: str | None = None,
           scope: str | None = None) -> _Finding:
    return _Finding(Problem(kind="stray", sd_id=dom.sd_id, path=path,
                            img_id=img_id,
                            detail="not a name of ours; never touched"),
                    scope=scope)


def _is_temp(name: str) -> bool:
    return name.startswith((sc.TEMP_PREFIX, sc.REMOVE_PREFIX))


def _scan_domain(dom, work: _Work, blocker: str | None) -> list[_Finding]:
    """Leftovers and strays of ``dom_md/``, ``images/`` and the mount."""
    found = []
    md_dir = os.path.join(dom.path, sc.DOM_MD)
    for name in sorted(os.listdir(md_dir)):
        if _is_temp(name) or name.endswith(sc.NEW_EXT):
            found.append(_leftover(dom, os.path.join(md_dir, name), blocker,
                                   min_age=MIN_AGE))
    for name in sorted(os.listdir(dom.images_dir)):
        path = os.path.join(dom.images_dir, name)
        if validate.is_uuid(name):
            if not os.path.isdir(path) or os.path.islink(path):
                found.append(_stray(dom, path))
            continue
        prefix = next((p for p in (sc.TEMP_PREFIX, sc.REMOVE_PREFIX)
                       if name.startswith(p)), None)
        if prefix is not None and validate.is_uuid(name[len(prefix):]):
            # An image being built or removed: fenced by its image lease
            # and by the book of the flow doing it.
            img_id = name[len(prefix):]
            found.append(_leftover(
                dom, path, blocker or work.blocker(dom.sd_id, img_id),
                img_id=img_id, lease_img=img_id))
        elif prefix is not None or name.endswith(sc.NEW_EXT):
            found.append(_leftover(dom, path, blocker, min_age=MIN_AGE))
        else:
            found.append(_stray(dom, path))
    staging = sc.TEMP_PREFIX + dom.sd_id
    for name in sorted(os.listdir(dom.mount)):
        if name.startswith(staging):
            path = os.path.join(dom.mount, name)
            found.append(_leftover(
                dom, path, blocker, min_age=STAGING_MIN_AGE,
                in_use=os.path.abspath(path) in work.in_use))
    return found


def _chain_problems(tree: image.ImageTree) -> list[errors.StorageError]:
    """Every chain problem of ``tree``: links, loops, the legal leaf, and
    each volume's data against its metadata (qcow2 headers).

    The one place that chooses the check: ImageTree.problems() when it
    exists, else the metadata-only ImageTree.check()."""
    problems = getattr(tree, "problems", None)
    if problems is not None:
        return problems()
    return tree.check()


def _backing_file(path: str) -> str | None:
    """The qcow2 backing file name of ``path``; None if it is not qcow2
    or cannot be read."""
    try:
        return qcow2.read_header(path).backing_file
    except (errors.StorageError, OSError):
        return None


@dataclasses.dataclass
class _Files:
    """The names of one volume id found in an image directory."""

    data: bool = False
    meta: bool = False
    lease: bool = False
    meta_new: bool = False

    def describe(self) -> str:
        have = [n for n, ok in (("data", self.data), ("meta", self.meta),
                                ("lease", self.lease),
                                ("meta.new", self.meta_new)) if ok]
        return "has only " + (", ".join(have) or "nothing")


def _scan_image(dom, img_id: str, work: _Work,
                blocker: str | None) -> list[_Finding]:
    directory = dom.image_dir(img_id)
    blocker = blocker or work.blocker(dom.sd_id, img_id)
    found: list[_Finding] = []

    def add(problem: Problem, lease: bool = True) -> None:
        found.append(_Finding(problem, scope=img_id,
                              lease_img=img_id if lease else None))

    files: dict[str, _Files] = {}
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if name.endswith(sc.NEW_EXT):
            # Written by atomic_write, only under the domain lease that
            # repair holds when it removes one.
            found.append(_leftover(dom, path, blocker, img_id=img_id,
                                   lease_img=img_id, scope=img_id))
            stem = name[:-len(sc.META_EXT + sc.NEW_EXT)]
            if (name.endswith(sc.META_EXT + sc.NEW_EXT)
                    and validate.is_uuid(stem)):
                files.setdefault(stem, _Files()).meta_new = True
            continue
        if _is_temp(name):
            found.append(_leftover(dom, path, blocker, img_id=img_id,
                                   lease_img=img_id, scope=img_id,
                                   min_age=MIN_AGE))
            continue
        stem, ext = name, ""
        for suffix in (sc.META_EXT, sc.LEASE_EXT):
            if name.endswith(suffix):
                stem, ext = name[:-len(suffix)], suffix
        if not validate.is_uuid(stem) or not os.path.isfile(path) \
                or os.path.islink(path):
            add(_stray(dom, path, img_id).problem, lease=False)
            continue
        entry = files.setdefault(stem, _Files())
        if ext == sc.META_EXT:
            entry.meta = True
        elif ext == sc.LEASE_EXT:
            entry.lease = True
        else:
            entry.data = True

    # Metadata, and who names whom.
    volumes: dict[str, image.Volume] = {}
    unreadable = False
    for vol_id, entry in sorted(files.items()):
        if not entry.meta:
            continue
        path = dom.volume_path(img_id, vol_id)
        try:
            meta = dom.read_volume_meta(img_id, vol_id)
        except (errors.MetadataError, errors.VolumeNotFound,
                errors.InvalidParameter, OSError) as e:
            unreadable = True
            add(Problem(kind="bad-metadata", sd_id=dom.sd_id, img_id=img_id,
                        vol_id=vol_id, path=path + sc.META_EXT,
                        detail=f"{e}; never repaired"), lease=False)
            continue
        volumes[vol_id] = image.Volume(vol_id=vol_id, path=path, meta=meta)
    named: dict[str, list[str]] = {}
    for vol_id, entry in files.items():
        parent = volumes[vol_id].parent if vol_id in volumes else None
        backing = _backing_file(dom.volume_path(img_id, vol_id)) \
            if entry.data else None
        for target in {parent, backing} - {None}:
            named.setdefault(target, []).append(vol_id)
    tree = image.ImageTree(dom.sd_id, img_id, volumes)
    problems = _chain_problems(tree)

    # Volumes that may be removed: ILLEGAL, named by nothing, and either
    # without data or a LEAF (a half-made snapshot or revert layer).
    removable = {
        vol_id for vol_id, vol in volumes.items()
        if vol.meta.legality == sc.Legality.ILLEGAL
        and vol.meta.image == img_id and vol_id not in named
        and (not files[vol_id].data
             or vol.meta.voltype == sc.VolumeType.LEAF)}
    # The image as it would be without them: whole means one legal leaf,
    # every chain complete and consistent, all metadata readable.
    rest = problems if not removable else _chain_problems(image.ImageTree(
        dom.sd_id, img_id,
        {k: v for k, v in volumes.items() if k not in removable}))
    whole = not unreadable and not rest

    for vol_id, entry in sorted(files.items()):
        path = dom.volume_path(img_id, vol_id)
        vol = volumes.get(vol_id)
        users = sorted(named.get(vol_id, []))
        if entry.data and entry.meta and entry.lease:
            if vol is not None and not vol.legal:
                add(_illegal(dom, tree, vol, users, blocker, removable,
                             whole))
            continue
        if not (entry.data or entry.meta or entry.lease):
            continue            # a lone .meta.new: a leftover, above
        detail = entry.describe()
        action = None
        if not entry.data and not entry.meta:
            why = blocker
        elif not entry.data:
            if vol is None:
                continue        # unreadable metadata: reported above
            why = blocker or _keep_metadata(img_id, vol, users)
            if why is None and unreadable:
                why = "other metadata of the image is unreadable"
        elif not entry.meta:
            detail += "; data without metadata"
            why = blocker or (f"named by {', '.join(users)}" if users
                              else None)
            if why is None and not whole:
                why = "the image is not whole"
            if why is None:
                action = _QUARANTINE
        else:
            why = "a volume with data: left for a human"
        if action is None and why is None:
            action = _REMOVE
        if why is not None:
            detail += f"; kept: {why}"
        elif action == _QUARANTINE:
            detail += "; moved aside by repair"
        add(Problem(kind="orphan", sd_id=dom.sd_id, img_id=img_id,
                    vol_id=vol_id, path=path, detail=detail,
                    garbage=action == _REMOVE,
                    quarantine=action == _QUARANTINE))

    for e in problems:
        add(Problem(kind="broken-chain", sd_id=dom.sd_id, img_id=img_id,
                    vol_id=getattr(e, "vol_id", None), path=directory,
                    detail=str(e)), lease=False)
    return found


def _keep_metadata(img_id: str, vol: image.Volume,
                   users: list[str]) -> str | None:
    """Why metadata without data is kept (None: it is garbage)."""
    if vol.legal:
        return "LEGAL metadata whose data is missing"
    if users:
        return f"named by {', '.join(users)}"
    if vol.meta.image != img_id:
        return "a volume of another image"
    return None


def _illegal(dom, tree: image.ImageTree, vol: image.Volume,
             users: list[str], blocker: str | None, removable: set[str],
             whole: bool) -> Problem:
    why = blocker
    if why is None and users:
        why = f"named by {', '.join(users)}"
    if why is None and vol.meta.image != tree.img_id:
        why = "a volume of another image"
    if why is None and vol.meta.voltype != sc.VolumeType.LEAF:
        why = f"{vol.meta.voltype} with data"
    if why is None and (vol.vol_id not in removable or not whole):
        others = [v for v in tree.own_volumes()
                  if v.legal and v.meta.voltype == sc.VolumeType.LEAF]
        why = ("the image's only leaf: its data" if not others
               else "the rest of the image is not whole")
    detail = f"ILLEGAL {vol.meta.voltype} volume"
    if why is not None:
        detail += f"; kept: {why}"
    return Problem(kind="illegal-volume", sd_id=dom.sd_id,
                   img_id=tree.img_id, vol_id=vol.vol_id, path=vol.path,
                   detail=detail, garbage=why is None)


# Repairing


def repair(pool) -> Report:
    """Recover flows, remove garbage, quarantine unnamed orphan data, and
    report what is left (see the module docstring)."""
    recovered = pool.recover()
    repaired = [Problem(kind="leftover", sd_id=pool.master.sd_id, path=path,
                        detail="stale logbook file", garbage=True)
                for path in logbook.sweep(pool.runner.backend,
                                          LOGBOOK_MIN_AGE)]
    quarantined: list[Problem] = []
    left: dict[tuple[str, str, str | None], str] = {}
    stamp = datetime.datetime.now(datetime.UTC).strftime(
        "%Y%m%dT%H%M%S.%fZ")
    # Counters last: the other repairs may change what they count.
    for finding in sorted(_check(pool),
                          key=lambda f: f.problem.kind == "counters"):
        if finding.action is None:
            continue
        try:
            done = _repair_one(pool, finding, stamp)
        except errors.LeaseTimeout as e:
            LOG.warning("Not repairing %s %s: %s", finding.problem.kind,
                        finding.problem.path, e)
            left[finding.key] = f"not repaired: {e}"
            continue
        except (OSError, errors.StorageError) as e:
            LOG.exception("Repairing %s %s failed", finding.problem.kind,
                          finding.problem.path)
            left[finding.key] = f"repair failed: {e}"
            continue
        if done is None:
            continue
        if finding.action == _QUARANTINE:
            quarantined.append(done)
        else:
            repaired.append(done)
    report = Report(problems=[
        dataclasses.replace(f.problem,
                            detail=f"{f.problem.detail}; {left[f.key]}")
        if f.key in left else f.problem for f in _check(pool)])
    report.repaired = repaired
    report.recovered = recovered
    report.quarantined = quarantined
    return report


def _repair_one(pool, finding: _Finding, stamp: str) -> Problem | None:
    """Act on one finding under its leases, if it still holds there;
    return what was done (None: it changed, nothing done)."""
    problem = finding.problem
    dom = pool.domains[problem.sd_id]
    if problem.kind == "counters":
        return _repair_counters(pool, dom, problem)
    with contextlib.ExitStack() as stack:
        if finding.lease_img is not None:
            stack.enter_context(pool.lease_manager.image_lease(
                dom, finding.lease_img))
        stack.enter_context(pool.lease_manager.domain_lease(dom))
        current = _recheck(pool, dom, finding)
        if current is not None and current.problem.img_id is not None:
            stack.enter_context(counters.accounting(
                dom, current.problem.img_id))
        if current is None:
            LOG.info("Not repairing %s %s: it changed", problem.kind,
                     problem.path)
            return None
        if finding.action == _QUARANTINE:
            where = _quarantine(dom, current.problem, stamp)
            LOG.warning("Quarantined %s at %s", problem.path, where)
            return dataclasses.replace(
                current.problem, detail=f"{current.problem.detail}; "
                f"moved to {where}")
        _remove(dom, current.problem)
        LOG.info("Removed %s %s", problem.kind, problem.path)
        return current.problem


def _repair_counters(pool, dom, problem: Problem) -> Problem | None:
    """Rewrite the domain's counters from a scan under its lease (None:
    they were right by then)."""
    with pool.lease_manager.domain_lease(dom):
        if _domain_metadata_problem(dom) is not None:
            return None
        old, new = counters.rebuild(dom)
    if old is not None and old.counters == new:
        return None
    LOG.warning("Rewrote the counters of domain %s: %s", dom.sd_id,
                _describe(new))
    return dataclasses.replace(
        problem, detail=f"{problem.detail}; now {_describe(new)}")


def _recheck(pool, dom, finding: _Finding) -> _Finding | None:
    """The finding as it is now (the caller holds its leases), if repair
    may still do the same to it."""
    frozen = _domain_metadata_problem(dom)
    if frozen is not None:
        return None
    work = _work(pool, _pending(pool), _legacy_books(pool))
    blocker = work.blocker(dom.sd_id)
    if finding.scope is None:
        fresh = _scan_domain(dom, work, blocker)
    elif os.path.isdir(dom.image_dir(finding.scope)):
        fresh = _scan_image(dom, finding.scope, work, blocker)
    else:
        return None
    for f in fresh:
        if f.key == finding.key and f.action == finding.action:
            return f
    return None


def _remove(dom, problem: Problem) -> None:
    path = problem.path
    if problem.vol_id and problem.kind in ("orphan", "illegal-volume"):
        # As actions removes a volume: data first, metadata last, so an
        # interruption leaves ILLEGAL metadata that is found again.
        for ext in ("", sc.LEASE_EXT, sc.META_EXT + sc.NEW_EXT,
                    sc.META_EXT):
            fileutil.remove_file(path + ext)
    elif os.path.isdir(path) and not os.path.islink(path):
        fileutil.remove_tree(path)
    else:
        fileutil.remove_file(path)
    fileutil.fsync_dir(os.path.dirname(path))


def _quarantine(dom, problem: Problem, stamp: str) -> str:
    """Move an orphan's files to <sd>/.quarantine/<stamp>/<img>/."""
    dest = os.path.join(dom.path, QUARANTINE, stamp, problem.img_id or "")
    os.makedirs(dest, exist_ok=True)
    moved = False
    for ext in ("", sc.LEASE_EXT, sc.META_EXT + sc.NEW_EXT):
        src = problem.path + ext
        if os.path.lexists(src):
            os.rename(src, os.path.join(dest, os.path.basename(src)))
            moved = True
    if moved:
        fileutil.fsync_dir(dest)
        fileutil.fsync_dir(os.path.dirname(problem.path))
    return dest
