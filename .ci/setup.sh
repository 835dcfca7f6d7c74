#!/usr/bin/env bash
# Sets up the test environments; idempotent, and quick when nothing changed.
#
#   .ci/setup.sh              the venv and every host overlay
#   .ci/setup.sh venv         only .venv (requirements.txt + requirements-dev.txt)
#   .ci/setup.sh a1111 forge  only the named overlays (and .venv first)
#   .ci/setup.sh gradio3 gradio4  the UI test overlays (gradio with its dependencies)
#   .ci/setup.sh a1111-host   a real venv with A1111 1.10's pinned set, for install.py's test
#
# .venv        the newest stack: requirements*.txt at their newest releases (pip's
#              cap on this machine keeps torch at 2.14.1 / torchvision 0.29.1).
# .ci/envs/X   a host stack: the exact packages listed in .ci/X.txt, installed with
#              --no-deps into a folder that goes ahead of .venv on PYTHONPATH;
#              torch and everything else heavy stays shared from .venv.
# .ci/envs/a1111-host  a venv of its own: .ci/a1111-host.txt installed with dependencies, as
#              A1111 installs its requirements; .venv's torch is shared into it (.ci/share_torch.py).
#
# Each step keeps a stamp (sha256 of its inputs) and is skipped when it matches.
# Environment: PYTHON (default python3) makes the venv; FORCE=1 rebuilds.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PYTHON="${PYTHON:-python3}"
VENV="$ROOT/.venv"
VPY="$VENV/bin/python"
ENVS="$ROOT/.ci/envs"
OVERLAYS=(a1111 forge)

log() { printf '[setup] %s\n' "$*"; }

# pip on this machine prints one warning per package for its file:// indexes that
# lack that package; drop those lines, keep everything else and pip's exit status.
pip_quiet() {
    "$VPY" -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

stamp_of() {  # sha256 over the given files plus the interpreter's version and platform
    {
        cat "$@"
        "$VPY" -c 'import sys, platform; print(sys.version, platform.machine())'
    } | sha256sum | cut -d' ' -f1
}

setup_venv() {
    local t0=$SECONDS
    if [[ ! -x "$VPY" ]] || ! "$VPY" -c 'import sys' 2>/dev/null; then
        log "creating $VENV with $("$PYTHON" --version 2>&1)"
        rm -rf "$VENV"
        "$PYTHON" -m venv "$VENV"
    fi
    local want have=""
    want="$(stamp_of requirements.txt requirements-dev.txt)"
    [[ -f "$VENV/.ci-stamp" ]] && have="$(cat "$VENV/.ci-stamp")"
    if [[ "${FORCE:-0}" != 1 && "$want" == "$have" ]]; then
        log ".venv up to date"
        return
    fi
    log "pip install -r requirements.txt -r requirements-dev.txt into .venv"
    pip_quiet install --quiet -r requirements.txt -r requirements-dev.txt
    # .venv may hold packages from another run; say so rather than fail later.
    pip_quiet check || log "WARNING: pip check found conflicts in .venv (see above)"
    echo "$want" > "$VENV/.ci-stamp"
    log ".venv ready in $((SECONDS - t0))s"
}

build_overlay() {
    local name="$1" t0=$SECONDS
    local pins="$ROOT/.ci/$name.txt" dest="$ENVS/$name"
    [[ -f "$pins" ]] || { echo "no pin list $pins" >&2; return 2; }
    local want have=""
    want="$(stamp_of "$pins")"
    [[ -f "$dest/.ci-stamp" ]] && have="$(cat "$dest/.ci-stamp")"
    if [[ "${FORCE:-0}" != 1 && "$want" == "$have" ]]; then
        log "overlay $name up to date"
        return
    fi
    log "building overlay $name from .ci/$name.txt"
    mkdir -p "$ENVS"
    local tmp="$ENVS/.$name.tmp.$$"
    rm -rf "$tmp"
    # --no-deps: only the listed packages, nothing heavy (torch) is ever pulled in.
    # --only-binary: a missing wheel fails here instead of compiling for minutes.
    # The UI overlays (gradio3, gradio4) are the exception: gradio with its own dependencies
    # (gradio 3.41's ffmpy is an sdist), for the tests/ui stages only.
    local opts=(--no-deps --only-binary=:all:)
    [[ "$name" == gradio* ]] && opts=()
    pip_quiet install --quiet "${opts[@]}" --no-compile \
        --target "$tmp" -r "$pins"
    rm -rf "$dest"
    mv "$tmp" "$dest"
    echo "$want" > "$dest/.ci-stamp"
    log "overlay $name ready in $((SECONDS - t0))s"
}

build_host_venv() {
    local name="$1" t0=$SECONDS
    local pins="$ROOT/.ci/$name.txt" dest="$ENVS/$name"
    local want have=""
    want="$(stamp_of "$pins" "$ROOT/.ci/share_torch.py")"
    [[ -f "$dest/.ci-stamp" ]] && have="$(cat "$dest/.ci-stamp")"
    if [[ "${FORCE:-0}" != 1 && "$want" == "$have" ]]; then
        log "host venv $name up to date"
        return
    fi
    log "building host venv $name from .ci/$name.txt"
    rm -rf "$dest"
    mkdir -p "$ENVS"
    "$PYTHON" -m venv "$dest"
    "$VPY" "$ROOT/.ci/share_torch.py" "$dest"
    "$dest/bin/python" -m pip install --quiet --disable-pip-version-check -r "$pins" \
        2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
    echo "$want" > "$dest/.ci-stamp"
    log "host venv $name ready in $((SECONDS - t0))s"
}

main() {
    local targets=("$@")
    [[ ${#targets[@]} -eq 0 ]] && targets=(venv "${OVERLAYS[@]}")
    setup_venv
    local t
    for t in "${targets[@]}"; do
        case "$t" in
            venv) ;;
            *-host) build_host_venv "$t" ;;
            *) build_overlay "$t" ;;
        esac
    done
}

main "$@"
