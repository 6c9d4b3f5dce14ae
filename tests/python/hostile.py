"""A Python task that misbehaves on purpose; the first argument picks how."""

import sys

mode = sys.argv[1]

if mode == "spin":
    while True:
        pass
elif mode == "memory-bomb":
    hoard = []
    while True:
        hoard.append(bytearray(16 << 20))
elif mode == "read-host-file":
    print(open("/etc/passwd").read())
elif mode == "os-system":
    import os

    sys.exit(os.system("echo escaped > /out/escaped"))
elif mode == "subprocess":
    import subprocess

    subprocess.run(["ls", "/"])
elif mode == "socket":
    import socket

    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.connect(("127.0.0.1", 4222))
elif mode == "ctypes":
    import ctypes

    ctypes.CDLL(None).system(b"echo escaped")
elif mode == "write-outside-out":
    for path in ["/in/x", "/job/x", "/usr/local/lib/x", "/usr/local/grid/x", "/x", "/tmp/../x", "/out/../x"]:
        try:
            open(path, "w").write("x")
            print(f"WROTE {path}")
        except OSError as e:
            print(f"refused {path}: {type(e).__name__}")
    sys.exit(3)
elif mode == "print-flood":
    line = "x" * 1000
    for _ in range(200_000):
        print(line)
elif mode == "fill-tmp":
    with open("/tmp/fill", "wb") as f:
        while True:
            f.write(b"x" * (1 << 20))
elif mode == "recursion":
    def f(n):
        return f(n + 1) + 1

    f(0)
else:
    sys.exit(f"unknown mode {mode}")
