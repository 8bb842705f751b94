#!/usr/bin/env python3
"""Where a cache hit's instructions go: two callgrind dumps (the bare tonic server's and the
router's, as `scenarios.py callgrind` leaves them in its temporary directory), read side by
side, per call.

    python3 benches/callgrind_diff.py BARE_DUMP ROUTER_DUMP CALLS           # self cost, router - bare
    python3 benches/callgrind_diff.py BARE_DUMP ROUTER_DUMP CALLS memcpy    # who calls memcpy, each

`callgrind_annotate` attributes everything to `clone` for dumps taken with `callgrind_control
-d`, hence this reader: self cost per function from the cost lines that follow `fn=`, and a
callee's inclusive cost from the cost line after each `calls=`. Names are compressed as
`(id) name` on first use and `(id)` after, which it resolves.
"""
import collections
import re
import sys


def read(path, callee=None):
    """Self cost per function; with `callee`, the inclusive cost of calls to it per caller."""
    names, own, calls = {}, collections.Counter(), collections.Counter()
    fn = cfn = None
    after_calls = False

    def name(line, prefix):
        m = re.match(prefix + r"=\((\d+)\)(?: (.*))?", line)
        if not m:
            return line[len(prefix) + 1:]
        if m.group(2):
            names[m.group(1)] = m.group(2)
        return names.get(m.group(1), m.group(1))

    for line in open(path, errors="replace"):
        line = line.rstrip("\n")
        if line.startswith("fn="):
            fn, after_calls = name(line, "fn"), False
        elif line.startswith("cfn="):
            cfn = name(line, "cfn")
        elif line.startswith("calls="):
            after_calls = True
        elif line[:1].isdigit() or line[:1] in "+-*":
            parts = line.split()
            if len(parts) < 2:
                continue
            if after_calls:
                after_calls = False
                if callee and cfn and callee in cfn:
                    calls[fn] += int(parts[1])
            else:
                own[fn] += int(parts[1])
    return own, calls


def main():
    if len(sys.argv) not in (4, 5):
        sys.exit(__doc__)
    bare_path, router_path, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    callee = sys.argv[4] if len(sys.argv) == 5 else None
    bare, bare_calls = read(bare_path, callee)
    router, router_calls = read(router_path, callee)
    print(f"per call: bare {sum(bare.values()) / n:,.0f}, router {sum(router.values()) / n:,.0f}")
    if callee:
        print(f"\ncalls to {callee}, inclusive, per call: router | bare | caller")
        for f, v in router_calls.most_common(30):
            print(f"{v / n:8.0f} {bare_calls[f] / n:8.0f}  {f[:140]}")
        return
    print("\nself cost per call: router - bare | router | bare | function")
    diff = {f: router[f] - bare[f] for f in set(bare) | set(router)}
    for f, v in sorted(diff.items(), key=lambda kv: -kv[1])[:40]:
        print(f"{v / n:8.0f} {router[f] / n:8.0f} {bare[f] / n:8.0f}  {f[:140]}")


if __name__ == "__main__":
    main()
