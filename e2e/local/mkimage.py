#!/usr/bin/env python3
"""mkimage.py: build a single-layer OCI image tarball without Docker (test tooling, stdlib only).

The root filesystem is assembled from files of this machine: plain files, the installed files of
Debian packages (`dpkg -L`), busybox applet links, and the shared libraries every ELF file needs
(found with ldd). The layout is merged-/usr like Debian's (bin, sbin, lib, lib64 -> usr/...).
The result is an OCI image layout in a tar that `ctr images import` (and kind's
`load image-archive`) take; the image name is in the `io.containerd.image.name` annotation.

usage: mkimage.py --name REF --out TAR [--file SRC:DST]... [--deb PKG]... [--busybox]
                  [--link PATH:TARGET]... [--user-entry NAME:UID]... [--dir PATH:MODE]... [--env K=V]...
                  [--entrypoint JSON] [--cmd JSON] [--user U] [--workdir DIR]
"""
import argparse
import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile

SKIP_PREFIXES = ("/usr/share/doc", "/usr/share/man", "/usr/share/info", "/usr/share/locale",
                 "/usr/share/lintian", "/usr/share/bug", "/usr/share/bash-completion", "/usr/share/zsh")
MERGED = {"bin": "usr/bin", "sbin": "usr/sbin", "lib": "usr/lib", "lib64": "usr/lib64"}


def is_elf(path):
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def place(root, src, dst):
    """Copies src (a file or symlink of this machine) to dst inside root, keeping symlinks."""
    target = os.path.join(root, dst.lstrip("/"))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if os.path.lexists(target):
        if os.path.isdir(target) and not os.path.islink(target):
            return
        os.unlink(target)
    if os.path.islink(src):
        link = os.readlink(src)
        os.symlink(link, target)
        # Follow the link too (e.g. /etc/alternatives), so the image has what it points at.
        nxt = link if link.startswith("/") else os.path.normpath(os.path.join(os.path.dirname(dst), link))
        real_src = link if link.startswith("/") else os.path.normpath(os.path.join(os.path.dirname(src), link))
        if os.path.lexists(real_src) and not os.path.lexists(os.path.join(root, nxt.lstrip("/"))):
            place(root, real_src, nxt)
    elif os.path.isdir(src):
        os.makedirs(target, exist_ok=True)
    else:
        shutil.copy2(src, target)


def deb_files(pkg):
    out = subprocess.run(["dpkg", "-L", pkg], check=True, capture_output=True, text=True).stdout
    for path in out.splitlines():
        if not path.startswith("/") or path.startswith(SKIP_PREFIXES) or path in ("/.",):
            continue
        if os.path.lexists(path) and (os.path.islink(path) or not os.path.isdir(path)):
            yield path


def libs_of(path):
    out = subprocess.run(["ldd", path], capture_output=True, text=True)
    if out.returncode != 0:  # static binaries: "not a dynamic executable"
        return []
    found = []
    for line in out.stdout.splitlines():
        parts = line.split()
        if "=>" in parts:
            i = parts.index("=>")
            if i + 1 < len(parts) and parts[i + 1].startswith("/"):
                found.append(parts[i + 1])
        elif parts and parts[0].startswith("/"):
            found.append(parts[0])
    return found


def add_libraries(root):
    """Adds every shared library (and its symlink chain) that an ELF file in root needs."""
    seen = set()
    while True:
        wanted = set()
        for dirpath, _, files in os.walk(root):
            for n in files:
                p = os.path.join(dirpath, n)
                if not os.path.islink(p) and p not in seen and is_elf(p):
                    seen.add(p)
                    wanted.update(libs_of(p))
        new = [lib for lib in sorted(wanted) if not os.path.lexists(os.path.join(root, lib.lstrip("/")))]
        if not new:
            return
        for lib in new:
            place(root, lib, lib)
            real = os.path.realpath(lib)
            if real != lib:
                place(root, real, real)


def busybox(root):
    bb = "/bin/busybox"
    place(root, os.path.realpath(bb), "/usr/bin/busybox")
    applets = subprocess.run([bb, "--list-full"], check=True, capture_output=True, text=True).stdout
    for applet in applets.split():
        target = os.path.join(root, applet)
        if os.path.lexists(target) or applet.endswith("/busybox"):
            continue  # a real program of the same name wins (iproute2's ip, iptables, ...)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.symlink("/usr/bin/busybox", target)


def norm(ti):
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    ti.mtime = 0
    return ti


def pack(root, a):
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as t:
        for dirpath, dirs, files in os.walk(root):
            dirs.sort()
            for n in sorted(dirs + files):
                full = os.path.join(dirpath, n)
                t.add(full, arcname=os.path.relpath(full, root), recursive=False, filter=norm)
    layer = raw.getvalue()
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    gz = gzip.compress(layer, compresslevel=1, mtime=0)
    blobs = {}

    def blob(data):
        d = hashlib.sha256(data).hexdigest()
        blobs[d] = data
        return {"digest": "sha256:" + d, "size": len(data)}

    env = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"] + a.env
    config = {
        "architecture": "amd64", "os": "linux", "created": "1970-01-01T00:00:00Z",
        "config": {"Env": env, "Entrypoint": json.loads(a.entrypoint), "Cmd": json.loads(a.cmd),
                   "WorkingDir": a.workdir, "User": a.user},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "e2e/local/mkimage.py"}],
    }
    layer_desc = dict(mediaType="application/vnd.oci.image.layer.v1.tar+gzip", **blob(gz))
    config_desc = dict(mediaType="application/vnd.oci.image.config.v1+json", **blob(json.dumps(config).encode()))
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": config_desc, "layers": [layer_desc]}
    m = dict(mediaType="application/vnd.oci.image.manifest.v1+json", **blob(json.dumps(manifest).encode()))
    m["platform"] = {"architecture": "amd64", "os": "linux"}
    m["annotations"] = {"io.containerd.image.name": a.name,
                        "org.opencontainers.image.ref.name": a.name.rsplit(":", 1)[1]}
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [m]}
    tmp = a.out + ".tmp"
    with tarfile.open(tmp, "w") as t:
        def put(name, data):
            ti = norm(tarfile.TarInfo(name))
            ti.size = len(data)
            ti.mode = 0o644
            t.addfile(ti, io.BytesIO(data))
        put("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        put("index.json", json.dumps(index).encode())
        for d, data in blobs.items():
            put("blobs/sha256/" + d, data)
    os.replace(tmp, a.out)
    return m["digest"], len(layer)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--name", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--file", action="append", default=[], help="SRC:DST")
    p.add_argument("--deb", action="append", default=[])
    p.add_argument("--link", action="append", default=[], help="PATH:TARGET (a symlink, e.g. for Debian's alternatives)")
    p.add_argument("--busybox", action="store_true")
    p.add_argument("--user-entry", action="append", default=[], help="NAME:UID (passwd and group)")
    p.add_argument("--dir", action="append", default=[], help="PATH:MODE (octal)")
    p.add_argument("--env", action="append", default=[])
    p.add_argument("--entrypoint", default="null")
    p.add_argument("--cmd", default="null")
    p.add_argument("--user", default="")
    p.add_argument("--workdir", default="/")
    a = p.parse_args()

    root = tempfile.mkdtemp(prefix="mkimage-")
    try:
        os.chmod(root, 0o755)
        for top, real in MERGED.items():
            os.makedirs(os.path.join(root, real), exist_ok=True)
            os.symlink(real, os.path.join(root, top))
        for d in ("etc", "tmp", "proc", "sys", "dev", "run", "var/run", "root", "usr/local/bin"):
            os.makedirs(os.path.join(root, d), exist_ok=True)
        os.chmod(os.path.join(root, "tmp"), 0o1777)
        for pkg in a.deb:
            for path in deb_files(pkg):
                place(root, path, path)
        for spec in a.file:
            src, dst = spec.split(":", 1)
            if not os.path.exists(src):
                sys.exit(f"mkimage: {src} does not exist")
            place(root, os.path.realpath(src), dst)
        for spec in a.link:
            path, target = spec.split(":", 1)
            full = os.path.join(root, path.lstrip("/"))
            os.makedirs(os.path.dirname(full), exist_ok=True)
            os.symlink(target, full)
        if a.busybox:
            busybox(root)
        add_libraries(root)
        users = [("root", 0)] + [(n, int(u)) for n, u in (e.split(":") for e in a.user_entry)]
        with open(os.path.join(root, "etc/passwd"), "w") as f:
            for n, u in users:
                home = "/root" if u == 0 else f"/home/{n}"
                f.write(f"{n}:x:{u}:{u}:{n}:{home}:/bin/sh\n")
        with open(os.path.join(root, "etc/group"), "w") as f:
            for n, u in users:
                f.write(f"{n}:x:{u}:\n")
        for n, u in users:
            if u != 0:
                home = os.path.join(root, "home", n)
                os.makedirs(home, exist_ok=True)
                os.chmod(home, 0o755)
        for spec in a.dir:
            path, mode = spec.rsplit(":", 1)
            full = os.path.join(root, path.lstrip("/"))
            os.makedirs(full, exist_ok=True)
            os.chmod(full, int(mode, 8))
        for dirpath, dirs, files in os.walk(root):
            for n in files:
                full = os.path.join(dirpath, n)
                if not os.path.islink(full):
                    st = os.lstat(full)
                    os.chmod(full, stat.S_IMODE(st.st_mode) | stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
        digest, size = pack(root, a)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"{a.name} {digest} {size // 1024}KiB {a.out}")


if __name__ == "__main__":
    main()
