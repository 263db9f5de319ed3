#!/usr/bin/env python3
"""Build the throwaway test VM of the VM test tier (``make test-vm``).

Artifacts, in ``.vm/image/`` of the checkout (``--out`` changes ``.vm``):

``vmlinuz``
    Debian's ``linux-image-cloud-amd64`` kernel.
``initrd.img``
    A busybox initramfs that loads the virtio modules, mounts ``/dev/vda``
    and switches to ``/sbin/vm-init`` on it.
``root.img``
    An ext4 image of a ``debootstrap --variant=minbase bookworm`` root with
    open-iscsi, Debian's python3-os-brick, udev, kmod and iproute2, and
    the kernel's modules. Boot it with ``snapshot=on``: it is shared by
    every boot and never written.
``manifest.json``
    The build key, the kernel release and how long each step took.

``/sbin/vm-init`` mounts the API file systems, loads the network, console
and iSCSI modules, starts udevd, configures eth0 for QEMU's user network
(10.0.2.15/24, no default route: the host is 10.0.2.2) and runs
``/usr/local/sbin/vm-agent``: that stub opens the virtio-serial port named
``agent``, reads one JSON line ``{"agent": SOURCE}`` and runs ``main(fd)``
of that Python source. The agent itself (``tests/vm/agent.py``) is sent at
every boot, so it can change without a rebuild. When the agent returns,
init powers the guest off (sysrq ``o``); should init die, the kernel
panics, and with ``panic=-1`` and ``-no-reboot`` QEMU exits.

Cached: the build key is the sha256 of this file; a run that finds
``manifest.json`` with the same key and every artifact does nothing (no
apt, no network). Downloaded packages are kept in ``.vm/cache/`` for the
next build. Needs root and Debian's mirrors; installs the host packages it
needs (debootstrap, qemu-system-x86, busybox-static, cpio, ...) with
apt-get.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

TOP = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
DEFAULT_OUT = os.path.join(TOP, ".vm")
MIRROR = os.environ.get("VM_MIRROR", "http://deb.debian.org/debian")
SUITE = "bookworm"
KERNEL_PACKAGE = "linux-image-cloud-amd64"
ARTIFACTS = ("vmlinuz", "initrd.img", "root.img")

HOST_PACKAGES = ("debootstrap", "qemu-system-x86", "busybox-static", "cpio",
                 "e2fsprogs", "kmod")
"""What the build (and booting the VM) needs on this machine."""

GUEST_PACKAGES = ("kmod", "udev", "iproute2", "open-iscsi",
                  "python3-os-brick",
                  # os-brick runs it (extend_volume), Debian's package
                  # does not depend on it.
                  "lsscsi",
                  # debootstrap does not resolve virtual packages:
                  # python3-pycparser depends on python3-ply-lex-3.10.
                  "python3-ply")

INITRD_MODULES = ("virtio_pci", "virtio_blk")
"""Loaded by the initramfs, with their dependencies, to mount root (ext4
is built into Debian's cloud kernel)."""

GUEST_MODULES = ("virtio_net", "virtio_console", "iscsi_tcp", "sd_mod")

TRIM = ("usr/share/doc", "usr/share/man", "usr/share/locale",
        "usr/share/info", "var/cache/apt", "var/lib/apt/lists")
"""Removed from the root before making its image."""

_ENV = {**os.environ, "LC_ALL": "C", "DEBIAN_FRONTEND": "noninteractive"}

INITRAMFS_INIT = """\
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /modules); do
    insmod "/lib/modules/$m.ko" || echo "initramfs: cannot load $m"
done
n=0
while [ ! -b /dev/vda ] && [ "$n" -lt 300 ]; do sleep 0.1; n=$((n + 1)); done
if ! mount -t ext4 -o rw /dev/vda /root; then
    echo "initramfs: cannot mount /dev/vda"
    exit 1
fi
umount /proc /sys
mount --move /dev /root/dev
exec switch_root /root /sbin/vm-init
"""

VM_INIT = """\
#!/bin/sh
# The guest's init: no init system, just what the agent needs.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mkdir -p /run/lock /run/udev
echo "vm-init: userspace at $(cut -d' ' -f1 /proc/uptime)s"
echo vm > /proc/sys/kernel/hostname
modprobe -a {modules}
# For the devices to come (iSCSI disks and their /dev/disk/by-path links);
# no trigger for those of the boot: nothing here needs them (5 s in TCG).
/lib/systemd/systemd-udevd --daemon
ip link set lo up
ip link set eth0 up
# QEMU's user network; no default route: the host (10.0.2.2) only.
ip addr add 10.0.2.15/24 dev eth0
echo "vm-init: agent stub at $(cut -d' ' -f1 /proc/uptime)s"
python3 /usr/local/sbin/vm-agent
echo "vm-init: agent exited with $?"
sync
echo o > /proc/sysrq-trigger
"""

AGENT_STUB = '''\
#!/usr/bin/python3
"""Run the agent the host sends over the virtio-serial port "agent"."""
import glob
import json
import os


def port():
    for d in glob.glob("/sys/class/virtio-ports/*"):
        with open(os.path.join(d, "name")) as f:
            if f.read().strip() == "agent":
                return "/dev/" + os.path.basename(d)
    raise SystemExit("vm-agent: no virtio-serial port named agent")


fd = os.open(port(), os.O_RDWR)
data = b""
while not data.endswith(b"\\n"):
    chunk = os.read(fd, 65536)
    if not chunk:
        raise SystemExit("vm-agent: the host closed the port")
    data += chunk
namespace = {"__name__": "vm_agent"}
exec(compile(json.loads(data)["agent"], "agent.py", "exec"), namespace)
namespace["main"](fd)
'''


class BuildError(Exception):
    """A build step failed."""


def log(msg: str) -> None:
    print(f"vm-build: {msg}", flush=True)


def run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    """Run ``argv``; BuildError with its output when it fails."""
    proc = subprocess.run(argv, capture_output=True, text=True, env=_ENV,
                          check=False, **kw)
    if proc.returncode != 0:
        output = (proc.stdout + proc.stderr).strip()[-4000:]
        raise BuildError(f"{' '.join(argv)} failed (rc={proc.returncode}):"
                         f"\n{output}")
    return proc


def build_key() -> str:
    with open(os.path.abspath(__file__), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def cached(image_dir: str, key: str) -> bool:
    """Whether ``image_dir`` holds a complete build of ``key``."""
    try:
        with open(os.path.join(image_dir, "manifest.json")) as f:
            manifest = json.load(f)
    except (FileNotFoundError, ValueError):
        return False
    return manifest.get("key") == key and all(
        os.path.exists(os.path.join(image_dir, name)) for name in ARTIFACTS)


# Host packages


def missing_packages(names: tuple[str, ...]) -> list[str]:
    missing = []
    for name in names:
        proc = subprocess.run(
            ["dpkg-query", "-W", "-f=${db:Status-Status}", name],
            capture_output=True, text=True, check=False)
        if proc.stdout.strip() != "installed":
            missing.append(name)
    return missing


def ensure_host_packages() -> None:
    missing = missing_packages(HOST_PACKAGES)
    if not missing:
        return
    log(f"installing {' '.join(missing)}")
    run(["apt-get", "update", "-qq"])
    run(["apt-get", "install", "-y", "-qq", "--no-install-recommends",
         *missing], stdin=subprocess.DEVNULL)


# The root file system


def debootstrap(rootfs: str, cache: str) -> None:
    run(["debootstrap", "--variant=minbase", f"--cache-dir={cache}",
         f"--include={','.join(GUEST_PACKAGES)}", SUITE, rootfs, MIRROR])


def kernel_deb(cache: str) -> str:
    """Download the cloud kernel's package into ``cache``; its path."""
    package = _kernel_image_package()
    debs = [n for n in os.listdir(cache)
            if n.startswith(package + "_") and n.endswith(".deb")]
    if not debs:
        argv = ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root",
                package]
        try:
            run(argv, cwd=cache)
        except BuildError:  # Stale package lists: the mirror moved on.
            run(["apt-get", "update", "-qq"])
            package = _kernel_image_package()
            run([*argv[:-1], package], cwd=cache)
        debs = [n for n in os.listdir(cache)
                if n.startswith(package + "_") and n.endswith(".deb")]
    return os.path.join(cache, sorted(debs)[-1])


def _kernel_image_package() -> str:
    """linux-image-X-cloud-amd64, what the metapackage depends on."""
    for attempt in range(2):
        proc = subprocess.run(["apt-cache", "depends", KERNEL_PACKAGE],
                              capture_output=True, text=True, env=_ENV,
                              check=False)
        for line in proc.stdout.splitlines():
            key, _, value = line.strip().partition(": ")
            if key == "Depends" and value.startswith("linux-image-"):
                return value
        if attempt == 0:
            run(["apt-get", "update", "-qq"])
    raise BuildError(f"cannot resolve {KERNEL_PACKAGE}: {proc.stdout}"
                     f"{proc.stderr}")


def install_kernel(rootfs: str, deb: str, out: str) -> str:
    """Unpack the kernel package into ``rootfs`` (modules) and copy its
    kernel to ``out/vmlinuz``; the kernel release. No postinst: the
    initramfs is ours."""
    # Not dpkg-deb -x: its tar replaces the merged-/usr /lib symlink by a
    # directory.
    tar = subprocess.run(["dpkg-deb", "--fsys-tarfile", deb],
                         capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "--keep-directory-symlink", "-C", rootfs],
                   input=tar, check=True)
    releases = os.listdir(os.path.join(rootfs, "lib", "modules"))
    if len(releases) != 1:
        raise BuildError(f"expected one kernel, found {releases}")
    release = releases[0]
    run(["depmod", "-b", rootfs, release])
    boot = os.path.join(rootfs, "boot")
    shutil.copyfile(os.path.join(boot, f"vmlinuz-{release}"),
                    os.path.join(out, "vmlinuz"))
    shutil.rmtree(boot)
    os.mkdir(boot)
    return release


def customize(rootfs: str) -> None:
    _write(rootfs, "sbin/vm-init",
           VM_INIT.replace("{modules}", " ".join(GUEST_MODULES)), 0o755)
    _write(rootfs, "usr/local/sbin/vm-agent", AGENT_STUB, 0o755)
    _write(rootfs, "etc/hostname", "vm\n")
    # The agent writes the initiator name and starts iscsid itself;
    # iscsiadm starts it too if needed (there is no systemctl).
    conf = os.path.join(rootfs, "etc/iscsi/iscsid.conf")
    with open(conf) as f:
        text = f.read()
    text = text.replace("iscsid.startup = /bin/systemctl start iscsid.socket",
                        "iscsid.startup = /usr/sbin/iscsid")
    _write(rootfs, "etc/iscsi/iscsid.conf", text)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(rootfs, "etc/iscsi/initiatorname.iscsi"))
    for path in TRIM:
        shutil.rmtree(os.path.join(rootfs, path), ignore_errors=True)
        os.makedirs(os.path.join(rootfs, path), exist_ok=True)


def _write(rootfs: str, path: str, text: str, mode: int = 0o644) -> None:
    full = os.path.join(rootfs, path)
    os.makedirs(os.path.dirname(full), exist_ok=True)
    with open(full, "w") as f:
        f.write(text)
    os.chmod(full, mode)


def root_image(rootfs: str, out: str) -> None:
    used = int(run(["du", "-s", "-B1", "--apparent-size", rootfs])
               .stdout.split()[0])
    size_mib = used * 13 // 10 // 2**20 + 256
    path = os.path.join(out, "root.img")
    run(["mkfs.ext4", "-q", "-F", "-L", "vmroot", "-d", rootfs, path,
         f"{size_mib}M"])


# The initramfs


def initramfs(rootfs: str, release: str, out: str, tmp: str) -> None:
    moddir = os.path.join(rootfs, "lib", "modules", release)
    order = module_order(moddir, INITRD_MODULES)
    tree = os.path.join(tmp, "initramfs")
    for d in ("bin", "dev", "proc", "sys", "root", "lib/modules"):
        os.makedirs(os.path.join(tree, d))
    shutil.copy2("/bin/busybox", os.path.join(tree, "bin", "busybox"))
    names = []
    for rel in order:
        name = os.path.basename(rel)[:-len(".ko")]
        shutil.copyfile(os.path.join(moddir, rel),
                        os.path.join(tree, "lib", "modules", name + ".ko"))
        names.append(name)
    _write(tree, "modules", "\n".join(names) + "\n")
    _write(tree, "init", INITRAMFS_INIT, 0o755)
    files = run(["find", ".", "-print0"], cwd=tree).stdout
    with open(os.path.join(out, "initrd.img"), "wb") as f:
        subprocess.run(["cpio", "--quiet", "-o", "-0", "-H", "newc"],
                       input=files.encode(), stdout=f, cwd=tree, check=True)


def module_order(moddir: str, wanted: tuple[str, ...]) -> list[str]:
    """Module paths (relative to ``moddir``) of ``wanted`` and their
    dependencies, each after what it needs; built-in modules are left
    out."""
    deps = {}
    with open(os.path.join(moddir, "modules.dep")) as f:
        for line in f:
            path, _, needs = line.partition(":")
            deps[path] = needs.split()
    by_name = {os.path.basename(p)[:-len(".ko")].replace("-", "_"): p
               for p in deps}
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for dep in deps[path]:
            visit(dep)
        order.append(path)

    for name in wanted:
        if name in by_name:
            visit(by_name[name])
    return order


# Putting it together


def build(out: str, key: str) -> dict[str, float]:
    cache = os.path.join(out, "cache")
    os.makedirs(cache, exist_ok=True)
    timings: dict[str, float] = {}

    def step(name, fn, *args):
        start = time.monotonic()
        log(f"{name}...")
        result = fn(*args)
        timings[name] = round(time.monotonic() - start, 1)
        log(f"{name}: {timings[name]}s")
        return result

    step("host packages", ensure_host_packages)
    tmp = tempfile.mkdtemp(prefix="build-", dir=out)
    try:
        rootfs = os.path.join(tmp, "rootfs")
        new = os.path.join(tmp, "image")
        os.mkdir(new)
        deb = step("kernel download", kernel_deb, cache)
        step("debootstrap", debootstrap, rootfs, cache)
        release = step("kernel", install_kernel, rootfs, deb, new)
        step("customize", customize, rootfs)
        step("initramfs", initramfs, rootfs, release, new, tmp)
        step("root image", root_image, rootfs, new)
        manifest = {"key": key, "kernel": release, "suite": SUITE,
                    "timings": timings}
        _write(new, "manifest.json", json.dumps(manifest, indent=2) + "\n")
        publish(new, os.path.join(out, "image"))
    finally:
        _unmount_under(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
    return timings


def publish(new: str, image_dir: str) -> None:
    """Replace ``image_dir`` by the complete build ``new``."""
    if os.path.exists(image_dir):
        old = image_dir + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(image_dir, old)
        shutil.rmtree(old)
    os.rename(new, image_dir)


def _unmount_under(path: str) -> None:
    """Unmount what a failed debootstrap left mounted under ``path``."""
    with open("/proc/mounts") as f:
        points = [line.split()[1] for line in f]
    for point in sorted(points, reverse=True):
        if point == path or point.startswith(path + "/"):
            subprocess.run(["umount", "-l", point], check=False)


@contextlib.contextmanager
def _locked(out: str):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "build.lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help="where to build (default: .vm of the checkout)")
    parser.add_argument("--force", action="store_true",
                        help="build even if a build of this key exists")
    args = parser.parse_args(argv)
    out = os.path.abspath(args.out)
    image_dir = os.path.join(out, "image")
    key = build_key()
    start = time.monotonic()
    with _locked(out):
        if not args.force and cached(image_dir, key):
            log(f"{image_dir} is up to date ({key[:12]}): "
                f"{time.monotonic() - start:.2f}s")
            return 0
        if os.geteuid() != 0:
            log("needs root (debootstrap, apt-get)")
            return 1
        try:
            build(out, key)
        except BuildError as e:
            log(str(e))
            return 1
    log(f"built {image_dir} ({key[:12]}) in "
        f"{time.monotonic() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
