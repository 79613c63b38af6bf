#!/usr/bin/env python3
"""Where a wasm's code goes: function body sizes summed by crate, and the largest functions.

Reads the `name` section, so give it a wasm before `wasm-opt` strips the names: the one cargo
writes, or the one `wasm-bindgen` writes from it (without the descriptors it removes):

    cargo build --target wasm32-unknown-unknown --profile wasm-release --lib [--no-default-features]
    python3 benches/wasm-profile.py target/wasm32-unknown-unknown/wasm-release/pattern_mesh.wasm

A function counts under the crate its mangled name starts with, so a generic of `core` or
`alloc` counts under `core` or `alloc` whatever type it was instantiated for. wasm-bindgen's
`__wbindgen_describe_*` functions are listed apart: `wasm-bindgen` removes them.
"""
import collections
import re
import sys


def leb(data, i):
    """An unsigned LEB128 at `i`: (value, the index after it)."""
    value = shift = 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def sections(data):
    """(id, start, end) of every section."""
    if data[:4] != b"\0asm":
        sys.exit("not a wasm module")
    i = 8
    while i < len(data):
        sid = data[i]
        size, start = leb(data, i + 1)
        yield sid, start, start + size
        i = start + size


def imported_functions(data, start):
    count, i = leb(data, start)
    functions = 0
    for _ in range(count):
        for _ in range(2):  # module and field names
            length, i = leb(data, i)
            i += length
        kind = data[i]
        i += 1
        if kind == 0:  # function: a type index
            _, i = leb(data, i)
            functions += 1
        elif kind == 1:  # table: element type, limits
            i += 1
            flags, i = leb(data, i)
            _, i = leb(data, i)
            if flags & 1:
                _, i = leb(data, i)
        elif kind == 2:  # memory: limits
            flags, i = leb(data, i)
            _, i = leb(data, i)
            if flags & 1:
                _, i = leb(data, i)
        elif kind == 3:  # global: type, mutability
            i += 2
        else:
            sys.exit(f"unknown import kind {kind}")
    return functions


def crate_of(name):
    if name.startswith("__wbindgen_describe"):
        return "(wasm-bindgen descriptors, removed)"
    legacy = re.match(r"_ZN(\d+)", name)
    if legacy:
        length = int(legacy.group(1))
        first = name[legacy.end():legacy.end() + length]
        # `<T as Trait>::f` counts under the crate of T.
        impl = re.match(r"_\$LT\$([a-z_][a-z0-9_]*)\.\.", first)
        return impl.group(1) if impl else first
    # The demangled names wasm-bindgen writes: `<crate[hash]::T>::f`, `crate[hash]::f`, or
    # `crate::T::f::h<hash>`.
    demangled = re.search(r"([a-z_][a-z0-9_]*)\[[0-9a-f]+\]", name) or re.match(
        r"<*([a-z_][a-z0-9_]*)::", name
    )
    if demangled:
        return demangled.group(1)
    v0 = re.search(r"C[sn][A-Za-z0-9]*_(\d+)", name) or re.search(r"C(\d+)", name)
    if v0:
        length = int(v0.group(1))
        return name[v0.end():v0.end() + length]
    impl = re.match(r"_\$LT\$([a-z_][a-z0-9_]*)\.\.", name)
    if impl:
        return impl.group(1)
    return "(other)"


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    data = open(sys.argv[1], "rb").read()
    top = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    imports, bodies, names = 0, [], {}
    for sid, start, end in sections(data):
        if sid == 2:
            imports = imported_functions(data, start)
        elif sid == 10:
            count, i = leb(data, start)
            for _ in range(count):
                size, i = leb(data, i)
                bodies.append(size)
                i += size
        elif sid == 0:
            length, i = leb(data, start)
            if data[i:i + length] != b"name":
                continue
            i += length
            while i < end:
                sub = data[i]
                size, i = leb(data, i + 1)
                if sub == 1:
                    count, j = leb(data, i)
                    for _ in range(count):
                        index, j = leb(data, j)
                        length, j = leb(data, j)
                        names[index] = data[j:j + length].decode("utf-8", "replace")
                        j += length
                i += size
    if not names:
        sys.exit("no function names: give the wasm before wasm-bindgen and wasm-opt")
    by_crate = collections.Counter()
    functions = []
    for k, size in enumerate(bodies):
        name = names.get(imports + k, "?")
        by_crate[crate_of(name)] += size
        functions.append((size, name))
    total = sum(bodies)
    print(f"{len(bodies)} functions, {total} bytes of code")
    print("\nby crate (bytes, share of the code):")
    for crate, size in by_crate.most_common(top):
        print(f"{size:>9} {size / total:6.1%}  {crate}")
    print(f"\nthe {top} largest functions:")
    for size, name in sorted(functions, reverse=True)[:top]:
        print(f"{size:>9}  {name[:140]}")


if __name__ == "__main__":
    main()
