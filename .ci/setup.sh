#!/usr/bin/env bash
# Sets up the test environments; idempotent, and quick when nothing changed.
#
#   .ci/setup.sh              the venv and every host overlay
#   .ci/setup.sh venv         only .venv (requirements.txt + requirements-dev.txt)
#   .ci/setup.sh a1111 forge  only the named overlays (and .venv first)
#   .ci/setup.sh gradio3 gradio4 gradio6  the UI test overlays (gradio with its dependencies)
#   .ci/setup.sh a1111-host   a real venv with A1111 1.10's pinned set, for install.py's test
#   .ci/setup.sh comfyui      ComfyUI 0.8.0's source and its overlay, for tests/comfyui
#
# .venv        the newest stack: requirements*.txt at the newest releases the package index
#              offers (an index may cap torch, e.g. at 2.14.1 / torchvision 0.29.1).
# .ci/envs/X   a host stack: the exact packages listed in .ci/X.txt, installed with
#              --no-deps into a folder that goes ahead of .venv on PYTHONPATH;
#              torch and everything else heavy stays shared from .venv.
# .ci/envs/a1111-host  a venv of its own: .ci/a1111-host.txt installed with dependencies, as
#              A1111 installs its requirements; .venv's torch is shared into it (.ci/share_torch.py).
# .ci/envs/comfyui-src  ComfyUI 0.8.0's source (not on PyPI): from COMFYUI_SRC, a git dir (commit
#              3cd7b32f is archived) or a source tree (copied, without models/, custom_nodes/, ...).
#              COMFYUI_SRC unset and nothing extracted before: exit status 3 and one line saying how to set it.
# .ci/envs/comfyui  an overlay like a1111's: .ci/comfyui.txt (what ComfyUI 0.8.0 needs beyond .venv,
#              the frontend package 1.35.9 among them; never torch), ahead of .venv on PYTHONPATH.
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
COMFYUI_COMMIT=3cd7b32f1b7e7e90395cefe7d9f9b1f89276d8ce  # ComfyUI v0.8.0 + its release-workflow fix
COMFYUI_VERSION=0.8.0
NO_SOURCE=3  # exit status of `setup.sh comfyui` when no ComfyUI source is found (run_tests.sh: skipped)

log() { printf '[setup] %s\n' "$*"; }

# What pip prints to stderr, less two kinds of noise (pip's exit status is kept):
# - one warning per package for a file:// index that lacks it (a local wheel index);
# - the resolver's "ERROR: ... dependency conflicts" list. An overlay is installed with --target beside
#   .venv, so pip compares it with packages it cannot see; a host venv takes the host's own pins, which
#   conflict exactly so in the host. .ci/check_stack.py checks what each stack really imports; the
#   conflicts are counted in one line instead.
pip_filter() {
    awk '
        /is ignored: it is neither a file nor a directory/ { next }
        /^ERROR: pip.s dependency resolver does not currently take into account/ { listing = 1; next }
        listing && /requires .*, but you have|which is not installed\./ { conflicts++; next }
        { listing = 0; print }
        END { if (conflicts) printf "[setup] note: pip listed %d version conflict(s) with packages outside this install (expected here; .ci/check_stack.py checks the stack)\n", conflicts }
    ' >&2
}

pip_quiet() {
    "$VPY" -m pip "$@" 2> >(pip_filter)
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
        2> >(pip_filter)
    echo "$want" > "$dest/.ci-stamp"
    log "host venv $name ready in $((SECONDS - t0))s"
}

comfyui_git_dir() {  # prints the git dir holding COMFYUI_COMMIT, if $1 is (or has) one
    local d
    for d in "$1" "$1/.git"; do
        if [[ -e "$d" ]] && git --git-dir="$d" cat-file -e "$COMFYUI_COMMIT^{commit}" 2>/dev/null; then
            echo "$d"
            return
        fi
    done
}

COMFYUI_TREE_SKIP=(.git models custom_nodes input output temp user venv .venv)  # a user's, not ComfyUI's

comfyui_tree_files() {  # find over a ComfyUI source tree $1 without COMFYUI_TREE_SKIP; the rest of the args: the action
    local root="$1" prune=() d
    shift
    for d in "${COMFYUI_TREE_SKIP[@]}"; do prune+=(-path "$root/$d" -prune -o); done
    find "$root" "${prune[@]}" -name __pycache__ -prune -o -type f "$@"
}

extract_comfyui() {  # source ($1, a git dir or a source tree) -> the folder $2
    local src="$1" dest="$2" git_dir
    git_dir="$(comfyui_git_dir "$src")"
    if [[ -f "$src/main.py" && -f "$src/comfyui_version.py" && -z "$git_dir" ]]; then
        # A checkout or an unpacked release: its code only, none of a user's models or outputs.
        local skip=(--exclude=__pycache__) d
        for d in "${COMFYUI_TREE_SKIP[@]}"; do skip+=("--exclude=./$d"); done
        tar -C "$src" -cf - "${skip[@]}" . | tar -xf - -C "$dest"
        mkdir -p "$dest/custom_nodes" "$dest/models"
        return
    fi
    # A partial mirror may lack a blob (this one lacks a large tokenizer.json of an LLM text
    # encoder): leave such files out, with a line each, rather than fail on them.
    local missing=() type sha path
    while IFS=$'\t' read -r type sha path; do
        if [[ "$type" == blob ]] && ! git --git-dir="$git_dir" cat-file -e "$sha" 2>/dev/null; then
            missing+=(":(exclude)$path")
            log "WARNING: $path is missing from $git_dir; left out"
        fi
    done < <(git --git-dir="$git_dir" ls-tree -r --format=$'%(objecttype)\t%(objectname)\t%(path)' "$COMFYUI_COMMIT")
    git --git-dir="$git_dir" archive "$COMFYUI_COMMIT" -- . "${missing[@]}" 2> >(grep -v "^error: invalid object" >&2) |
        tar -xf - -C "$dest"
}

setup_comfyui() {
    local t0=$SECONDS src="${COMFYUI_SRC:-}"
    local dest="$ENVS/comfyui-src" want="" have="" git_dir=""
    [[ -n "$src" && -e "$src" ]] && git_dir="$(comfyui_git_dir "$src")"
    if [[ -n "$git_dir" ]]; then
        want="git $COMFYUI_COMMIT"
    elif [[ -f "$src/main.py" && -f "$src/comfyui_version.py" ]]; then
        want="tree $(cd "$src" && pwd -P) $(comfyui_tree_files "$src" -printf '%P %s %T@\n' | sort | sha256sum | cut -c1-16)"
    fi
    [[ -f "$dest/.ci-stamp" ]] && have="$(cat "$dest/.ci-stamp")"
    if [[ -z "$want" ]]; then
        if [[ -n "$have" && -f "$dest/main.py" ]]; then
            log "no ComfyUI source${src:+ at $src}: using the one extracted before ($have)"
        else
            [[ -n "$src" ]] && echo "COMFYUI_SRC=$src is neither a git dir holding ComfyUI $COMFYUI_VERSION nor a ComfyUI source tree" >&2
            echo "no ComfyUI $COMFYUI_VERSION source: set COMFYUI_SRC to a ComfyUI git dir or source tree (COMFYUI_SRC=~/ComfyUI ./run_tests.sh)" >&2
            exit "$NO_SOURCE"
        fi
    elif [[ "${FORCE:-0}" == 1 || "$want" != "$have" || ! -f "$dest/main.py" ]]; then
        log "extracting ComfyUI $COMFYUI_VERSION from $src into ${dest#"$ROOT/"}"
        mkdir -p "$ENVS"
        local tmp="$ENVS/.comfyui-src.tmp.$$"
        rm -rf "$tmp"
        mkdir -p "$tmp"
        extract_comfyui "$src" "$tmp"
        rm -rf "$dest"
        mv "$tmp" "$dest"
        echo "$want" > "$dest/.ci-stamp"
    else
        log "ComfyUI source up to date"
    fi
    if ! grep -q "__version__ = \"$COMFYUI_VERSION\"" "$dest/comfyui_version.py" 2>/dev/null; then
        echo "${dest#"$ROOT/"} is not ComfyUI $COMFYUI_VERSION: $(grep -s __version__ "$dest/comfyui_version.py")" >&2
        rm -f "$dest/.ci-stamp"
        return 1
    fi
    build_overlay comfyui
    local pkg
    for pkg in torch torchvision torchaudio; do
        if [[ -e "$ENVS/comfyui/$pkg" ]]; then
            echo "the comfyui overlay holds $pkg: it must come from .venv (check .ci/comfyui.txt)" >&2
            return 1
        fi
    done
    log "ComfyUI $COMFYUI_VERSION ready in $((SECONDS - t0))s (source ${dest#"$ROOT/"}, overlay .ci/envs/comfyui)"
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
            comfyui) setup_comfyui ;;
            *) build_overlay "$t" ;;
        esac
    done
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then  # run, not sourced (tests source it for pip_filter)
    main "$@"
fi
