"""Guest "linux": Debian's kernel + a busybox-static initramfs with our /init and tapguest.

Inputs are Debian packages only: the kernel .deb comes from `apt-get download`
(unpacked, never installed), busybox from busybox-static, and tapguest is
compiled here with gcc against libspice-protocol-dev's spice/vd_agent.h.

The kernel package ships no modules.dep (depmod runs at install time), so we
read each module's dependencies from its ELF .modinfo section ourselves and
write the load order to /etc/modules.load; /init insmods them in that order.
"""

from __future__ import annotations

import gzip
import lzma
import os
import shutil
import struct
import subprocess
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.harness.cache import HARNESS_DIR, cache_root, cached_build, content_key
from tests.harness.procs import PeerFailed, PeerMissing, need_program

SOURCES = [HARNESS_DIR / "guest_src" / name for name in ("init", "tapguest.c")]
VD_AGENT_H = Path("/usr/include/spice-1/spice/vd_agent.h")
BUSYBOX = Path("/bin/busybox")
# codec before controller: with no modprobe in the guest, the HDA controller
# binds whatever codec driver is already loaded
MODULES = [
    "qxl",
    "virtio_pci",
    "virtio_console",
    "snd_hda_codec_generic",
    "snd_hda_intel",
    "snd_pcm_oss",
    "xhci_pci",
    "usb_storage",
    "sr_mod",
    "sd_mod",
]
KERNEL_ENV = "SPICETAP_GUEST_KERNEL"  # e.g. 6.1.0-56-amd64, to pin the ABI


@dataclass(frozen=True)
class LinuxGuest:
    kernel: Path
    initrd: Path
    kernel_version: str


def kernel_version() -> str:
    pinned = os.environ.get(KERNEL_ENV)
    if pinned:
        return pinned
    out = subprocess.run(
        ["apt-cache", "depends", "linux-image-amd64"], capture_output=True, text=True, check=False
    ).stdout
    for line in out.splitlines():
        dep = line.strip().removeprefix("Depends: ")
        if dep.startswith("linux-image-") and dep != line.strip():
            return dep.removeprefix("linux-image-")
    raise PeerMissing(f"cannot resolve linux-image-amd64 (run apt-get update, or set {KERNEL_ENV})")


def kernel_deb(version: str) -> Path:
    """The kernel package, downloaded once into <cache>/debs."""
    debs = cache_root() / "debs"
    debs.mkdir(exist_ok=True)
    found = sorted(debs.glob(f"linux-image-{version}_*.deb"))
    if not found:
        result = subprocess.run(
            ["apt-get", "download", f"linux-image-{version}"],
            cwd=debs,
            capture_output=True,
            text=True,
            check=False,
            timeout=600,
        )
        found = sorted(debs.glob(f"linux-image-{version}_*.deb"))
        if not found:
            raise PeerFailed(f"apt-get download linux-image-{version} failed:\n{result.stderr}")
    return found[-1]


# How a package may store a module: plain (Debian 12), or compressed (Debian 13: .ko.xz).
# The guest's busybox insmod takes plain modules, so they are decompressed on the way in.
MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")


def module_name(path: str) -> str:
    name = Path(path).name
    for suffix in MODULE_SUFFIXES:
        if name.endswith(suffix):
            name = name.removesuffix(suffix)
    return name.replace("-", "_")


def module_bytes(path: Path) -> bytes:
    """A module file as insmod wants it: decompressed."""
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if path.name.endswith(".ko.zst"):
        # imported here: the GI client imports this package under the system Python
        import zstandard

        with zstandard.ZstdDecompressor().stream_reader(data) as reader:
            return reader.read()
    return data


def modinfo_depends(ko: bytes) -> list[str]:
    """The `depends=` field of a kernel module's .modinfo ELF section."""
    if ko[:4] != b"\x7fELF" or ko[4] != 2:
        raise PeerFailed("not a 64-bit ELF kernel module")
    (shoff,) = struct.unpack_from("<Q", ko, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", ko, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _t, _f, _a, offset, size = struct.unpack_from("<IIQQQQ", ko, shoff + i * shentsize)
        return name, offset, size

    _n, str_off, _s = section(shstrndx)
    for i in range(shnum):
        name, offset, size = section(i)
        if ko[str_off + name : ko.index(b"\0", str_off + name)] == b".modinfo":
            for field in ko[offset : offset + size].split(b"\0"):
                if field.startswith(b"depends="):
                    return [d.replace("-", "_") for d in field[8:].decode().split(",") if d]
            return []
    return []


def needs_loader(elf: bytes) -> bool:
    """True for a dynamically linked ELF64 program (it has a PT_INTERP header)."""
    (phoff,) = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    return any(struct.unpack_from("<I", elf, phoff + i * phentsize)[0] == 3 for i in range(phnum))


def _unpack_kernel(deb: Path, version: str, dest: Path) -> tuple[Path, dict[str, Path | None]]:
    """Extract vmlinuz and every module (flat, by module name, as stored) from the package.
    A module built into the kernel maps to None: it needs no loading."""
    dpkg_deb = need_program("dpkg-deb", "dpkg")
    modules: dict[str, Path | None] = {}
    kernel = dest / "vmlinuz"
    builtin = dest / "modules.builtin"
    (dest / "ko").mkdir(parents=True)
    with subprocess.Popen([dpkg_deb, "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE) as p:
        assert p.stdout is not None
        with tarfile.open(fileobj=p.stdout, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                if member.name.endswith(f"/boot/vmlinuz-{version}"):
                    target = kernel
                elif member.name.endswith(f"/modules/{version}/modules.builtin"):
                    target = builtin
                elif member.name.endswith(MODULE_SUFFIXES):
                    suffix = member.name[member.name.rindex(".ko") :]
                    target = dest / "ko" / f"{module_name(member.name)}{suffix}"
                    modules[module_name(member.name)] = target
                else:
                    continue
                source = tar.extractfile(member)
                assert source is not None
                with target.open("wb") as out:
                    shutil.copyfileobj(source, out, 1 << 20)
    if p.returncode or not kernel.exists():
        raise PeerFailed(f"could not unpack vmlinuz-{version} from {deb}")
    if builtin.exists():  # e.g. virtio_console, built in since Debian 13's kernel
        for line in builtin.read_text().splitlines():
            modules.setdefault(module_name(line), None)
    return kernel, modules


def load_order(wanted: list[str], available: dict[str, Path | None]) -> list[str]:
    """`wanted` plus dependencies, each after everything it depends on; those built into
    the kernel (None in `available`) left out."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order:
            return
        if name not in available:
            raise PeerFailed(f"kernel module {name} not in the kernel package")
        path = available[name]
        if path is None:
            return
        if name in visiting:
            raise PeerFailed(f"module dependency cycle at {name}")
        visiting.add(name)
        for dep in modinfo_depends(module_bytes(path)):
            visit(dep)
        order.append(name)

    for name in wanted:
        visit(name)
    return order


def _write_cpio(stage: Path, out: Path) -> None:
    cpio = need_program("cpio", "cpio")
    names = sorted(str(p.relative_to(stage)) for p in stage.rglob("*"))
    listing = "\n".join([".", *names]) + "\n"
    archive = subprocess.run(
        [cpio, "-o", "-H", "newc", "--quiet", "-R", "0:0"],
        cwd=stage,
        input=listing.encode(),
        capture_output=True,
        check=True,
    ).stdout
    out.write_bytes(gzip.compress(archive, compresslevel=1, mtime=0))


def _build(version: str, out: Path) -> None:
    gcc = need_program("gcc", "gcc libc6-dev")
    if not VD_AGENT_H.exists():
        raise PeerMissing(f"{VD_AGENT_H} missing: apt-get install libspice-protocol-dev")
    # the dynamic busybox package would also provide /bin/busybox, but the
    # initramfs has no libc to run it
    if not BUSYBOX.exists() or needs_loader(BUSYBOX.read_bytes()):
        raise PeerMissing("a static /bin/busybox is needed: apt-get install busybox-static")
    t0 = time.monotonic()
    work = out / "work"
    kernel, modules = _unpack_kernel(kernel_deb(version), version, work)
    stage = out / "stage"
    for sub in ("bin", "dev", "proc", "sys", "tmp", "etc", "lib/modules"):
        (stage / sub).mkdir(parents=True)
    order = load_order(MODULES, modules)
    for name in order:
        path = modules[name]
        assert path is not None  # load_order leaves out the built-in ones
        (stage / "lib" / "modules" / f"{name}.ko").write_bytes(module_bytes(path))
    (stage / "etc" / "modules.load").write_text("".join(f"{n}.ko\n" for n in order))
    shutil.copy(BUSYBOX, stage / "bin" / "busybox")
    subprocess.run(
        [
            gcc,
            "-O2",
            "-Wall",
            "-static",
            f"-I{VD_AGENT_H.parents[1]}",
            "-o",
            str(stage / "bin" / "tapguest"),
            str(SOURCES[1]),
            "-lm",
        ],
        check=True,
        capture_output=True,
    )
    shutil.copy(SOURCES[0], stage / "init")
    (stage / "init").chmod(0o755)
    _write_cpio(stage, out / "initrd.img")
    kernel.rename(out / "vmlinuz")
    (out / "build-info.txt").write_text(
        f"kernel {version}\nmodules {' '.join(order)}\nbuilt in {time.monotonic() - t0:.1f} s\n"
    )
    shutil.rmtree(work)
    shutil.rmtree(stage)


def build_linux_guest() -> LinuxGuest:
    """Kernel + initrd, rebuilt only when the sources, the builder or the kernel change."""
    version = kernel_version()
    inputs = [*SOURCES, Path(__file__), *([BUSYBOX] if BUSYBOX.exists() else [])]
    key = content_key(inputs, [version])
    folder = cached_build("guest-linux", key, lambda out: _build(version, out))
    return LinuxGuest(folder / "vmlinuz", folder / "initrd.img", version)
