"""Write the committed Fashion-MNIST subset under data/fashion-mnist-mini (standard library only).

Takes the first N training and M test samples of the full dataset (the four gzip IDX files of the
Debian package dataset-fashion-mnist, fetched by `cargo xtask data`) and writes them in the same
format, so the tests and `configs/quick.toml` run without any download.

    python3 scripts/make_fmnist_subset.py ~/.cache/mtkd/datasets/fashion-mnist data/fashion-mnist-mini 3000 1000
"""
import gzip
import struct
import sys
from pathlib import Path


def read_idx(path):
    data = gzip.open(path, "rb").read()
    ndim = data[3]
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return dims, data[4 + 4 * ndim :]


def write_idx(path, dims, payload):
    header = bytes([0, 0, 8, len(dims)]) + struct.pack(">" + "I" * len(dims), *dims)
    # mtime=0 keeps the output byte-identical between runs.
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        f.write(header + payload)


def main(src, dst, n_train, n_test):
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        (idims, ibytes) = read_idx(src / f"{split}-images-idx3-ubyte.gz")
        (ldims, lbytes) = read_idx(src / f"{split}-labels-idx1-ubyte.gz")
        per = idims[1] * idims[2]
        write_idx(dst / f"{split}-images-idx3-ubyte.gz", (n, idims[1], idims[2]), ibytes[: n * per])
        write_idx(dst / f"{split}-labels-idx1-ubyte.gz", (n,), lbytes[:n])
        counts = [lbytes[:n].count(bytes([c])) for c in range(10)]
        print(f"{split}: {n} samples, per class {counts}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
