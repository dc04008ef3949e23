#!/usr/bin/env python3
"""Build a small runnable OCI image from Debian's busybox-static, as an OCI layout directory.

    demo-image.py OUT_DIR [--variant TEXT] [--payload-mib N]

No image can be pulled from outside on these machines, so the demo and the runtime tests run
this one: /bin/busybox with its applets linked (sh, httpd, wget, ...) and /etc/demo-variant
holding TEXT, so different variants are different images. Deterministic: the same busybox and
variant give the same digest. --payload-mib adds a second, uncompressed layer holding /payload of
N MiB (written as it is made, for benchmarks of big images). Push it with
`skopeo copy --dest-tls-verify=false oci:OUT_DIR docker://127.0.0.1:PORT/NAME:TAG`.
"""
import argparse
import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile

def applets(busybox):
    try:
        out = subprocess.run([busybox, "--list"], capture_output=True, check=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        sys.exit(f"demo-image.py: {busybox} unusable ({e}): apt-get install busybox-static")
    return sorted(set(out.split()))


def layer(busybox, variant):
    names = applets(busybox)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        def add(name, kind, data=b"", mode=0o755, target=None):
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.mtime = kind, mode, 0
            if target:
                info.linkname = target
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

        for d in ["bin", "etc", "tmp", "www", "data"]:
            add(d, tarfile.DIRTYPE, mode=0o1777 if d == "tmp" else 0o755)
        with open(busybox, "rb") as f:
            add("bin/busybox", tarfile.REGTYPE, f.read())
        for applet in names:
            if applet != "busybox" and "/" not in applet:
                add(f"bin/{applet}", tarfile.SYMTYPE, target="busybox")
        add("etc/demo-variant", tarfile.REGTYPE, (variant + "\n").encode(), mode=0o644)
        add("etc/passwd", tarfile.REGTYPE, b"root:x:0:0:root:/:/bin/sh\n", mode=0o644)
    raw = buf.getvalue()
    gz = io.BytesIO()
    with gzip.GzipFile(fileobj=gz, mode="wb", mtime=0) as z:
        z.write(raw)
    return raw, gz.getvalue()


def blob(blobs, data):
    digest = hashlib.sha256(data).hexdigest()
    with open(os.path.join(blobs, digest), "wb") as f:
        f.write(data)
    return {"digest": "sha256:" + digest, "size": len(data)}


class HashingWriter:
    """A file that hashes and counts what is written to it."""

    def __init__(self, f):
        self.f, self.hash, self.size = f, hashlib.sha256(), 0

    def write(self, data):
        self.hash.update(data)
        self.size += len(data)
        return self.f.write(data)


def payload_layer(blobs, mib, variant):
    """An uncompressed layer of one file, /payload, of `mib` MiB: one random MiB (seeded by the
    variant) over and over, written straight to the blob directory."""
    import random
    chunk = random.Random(variant).randbytes(1 << 20)
    partial = os.path.join(blobs, ".payload.partial")
    with open(partial, "wb") as f:
        out = HashingWriter(f)
        with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            info = tarfile.TarInfo("payload")
            info.size, info.mode, info.mtime = mib << 20, 0o644, 0

            class Repeat:
                offset = 0

                def read(self, n):
                    piece = bytearray()
                    while len(piece) < n:
                        start = self.offset % len(chunk)
                        taken = chunk[start:start + n - len(piece)]
                        piece += taken
                        self.offset += len(taken)
                    return bytes(piece)

            tar.addfile(info, Repeat())
    digest = out.hash.hexdigest()
    os.rename(partial, os.path.join(blobs, digest))
    return {"digest": "sha256:" + digest, "size": out.size}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--variant", default="1")
    parser.add_argument("--busybox", default="/bin/busybox")
    parser.add_argument("--payload-mib", type=int, default=0)
    args = parser.parse_args()

    raw, compressed = layer(args.busybox, args.variant)
    blobs = os.path.join(args.out, "blobs", "sha256")
    os.makedirs(blobs, exist_ok=True)
    layers = [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **blob(blobs, compressed)}]
    diff_ids = ["sha256:" + hashlib.sha256(raw).hexdigest()]
    if args.payload_mib:
        payload = payload_layer(blobs, args.payload_mib, args.variant)
        layers.append({"mediaType": "application/vnd.oci.image.layer.v1.tar", **payload})
        diff_ids.append(payload["digest"])
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["sh"], "Env": ["PATH=/bin"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created_by": f"outpost demo-image.py variant {args.variant}"}],
    }
    config_bytes = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **blob(blobs, config_bytes)},
        "layers": layers,
    }
    manifest_bytes = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    descriptor = {"mediaType": manifest["mediaType"], **blob(blobs, manifest_bytes)}
    with open(os.path.join(args.out, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": [descriptor]}, f)
    with open(os.path.join(args.out, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    print(descriptor["digest"])


if __name__ == "__main__":
    main()
