#!/usr/bin/env bash
# The test command, for developers and CI alike:
#
#   ./run_tests.sh [pytest args...]
#
# 1. sets up .venv and the host overlays (.ci/setup.sh; quick when nothing changed),
# 2. ruff check .,
# 3. the test suite on each stack, each run with LORA_TRAINER_STACK set to its name:
#      newest  .venv as it is (newest diffusers / peft / transformers 5)
#      a1111   .ci/envs/a1111 ahead of .venv on PYTHONPATH (AUTOMATIC1111 1.10's set)
#      forge   .ci/envs/forge ahead of .venv on PYTHONPATH (Forge's set)
#
# 4. the UI tests (tests/ui), once per gradio version rather than per stack:
#      gradio3  gradio 3.41.2 on the a1111 stack (A1111 1.10's gradio)
#      gradio4  gradio 4.40.0 on the forge stack, plus the standalone UI driven in
#               headless Debian chromium (apt-get install -y chromium when missing)
#      gradio6  the newest gradio (6.31.0) on the newest stack: what `pip install gradio` gives the
#               standalone UI (`python -m lora_trainer ui`), browser test included
#
# 5. the pack in a real ComfyUI (tests/comfyui), once:
#      comfyui ComfyUI 0.8.0 (--cpu) with .ci/envs/comfyui ahead of .venv (.ci/comfyui.txt: the
#              frontend 1.35.9 and what else ComfyUI needs beyond .venv): the example graph run twice
#              through the HTTP API (the second from the cache), and loaded in the real frontend in
#              headless Debian chromium. ComfyUI's source is not on PyPI: .ci/setup.sh comfyui takes it
#              from COMFYUI_SRC (a git dir or a source tree), before the stacks (their DoRA test reads
#              ComfyUI's code too); without COMFYUI_SRC the stage is "skipped", with the line saying so
#
# 6. install.py into a real host environment (tests/install), once:
#      a1111   a venv with A1111 1.10's pinned set (.ci/a1111-host.txt): install.py run as A1111
#              and as ComfyUI-Manager run it must add only what is missing and move nothing
#
# Arguments go to every main pytest run. STACKS="newest forge" picks stacks; SKIP_RUFF=1
# skips lint; UI_STAGES="gradio4" picks UI stages (gradio3 gradio4 gradio6) ("" skips them); COMFYUI_STAGES="" skips step 5;
# INSTALL_STAGES="" skips step 6. Every stage runs even after a failure; the exit status is 1 if any
# stage failed ("skipped" is not a failure), and a pytest run that collects no test (exit 5) counts as failed.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"

STACKS="${STACKS:-newest a1111 forge}"
PY="$ROOT/.venv/bin/python"
T_START=$SECONDS
declare -a SUMMARY=()
FAILED=0
LOGS="$(mktemp -d)"
trap 'rm -rf "$LOGS"' EXIT

# No network at run time: nothing may reach a model hub.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export DO_NOT_TRACK=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

stage_done() {  # name, status, start-seconds
    local line
    line="$(printf '%-16s %-8s %4ds' "$1" "$2" $((SECONDS - $3)))"
    SUMMARY+=("$line")
    echo "==> $line"
    [[ "$2" == ok || "$2" == skipped ]] || FAILED=1
}

ensure_chromium() {  # Debian's chromium, for the stages that drive a browser
    command -v chromium >/dev/null && return
    { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } ||
        echo "could not install chromium (needs root and apt)" >&2
}

# --- setup -------------------------------------------------------------------
t=$SECONDS
overlays=()
for s in $STACKS; do [[ "$s" != newest ]] && overlays+=("$s"); done
if bash .ci/setup.sh venv "${overlays[@]}"; then
    stage_done setup ok "$t"
else
    stage_done setup FAIL "$t"
    printf '%s\n' "${SUMMARY[@]}"
    exit 1
fi
# ComfyUI's source before the stacks: their DoRA test also checks our files against ComfyUI's own code.
COMFYUI_SETUP=skipped
if [[ " ${COMFYUI_STAGES-comfyui} " == *" comfyui "* ]]; then
    bash .ci/setup.sh comfyui
    case $? in 0) COMFYUI_SETUP=ok ;; 3) COMFYUI_SETUP=none ;; *) COMFYUI_SETUP=FAIL ;; esac
fi

# --- lint --------------------------------------------------------------------
if [[ "${SKIP_RUFF:-0}" != 1 ]]; then
    t=$SECONDS
    echo "==> ruff check ."
    if "$PY" -m ruff check .; then stage_done ruff ok "$t"; else stage_done ruff FAIL "$t"; fi
fi

# --- tests, once per stack -------------------------------------------------------
for stack in $STACKS; do
    t=$SECONDS
    case "$stack" in
        newest) pypath="${PYTHONPATH:-}" ;;
        a1111 | forge) pypath="$ROOT/.ci/envs/$stack${PYTHONPATH:+:$PYTHONPATH}" ;;
        *) echo "unknown stack '$stack' (newest, a1111, forge)" >&2; stage_done "pytest[$stack]" FAIL "$t"; continue ;;
    esac
    echo "==> stack $stack"
    if ! env PYTHONPATH="$pypath" LORA_TRAINER_STACK="$stack" \
        "$PY" -W ignore::FutureWarning -W ignore::UserWarning .ci/check_stack.py "$stack"; then
        stage_done "pytest[$stack]" FAIL "$t"
        continue
    fi
    env PYTHONPATH="$pypath" LORA_TRAINER_STACK="$stack" "$PY" -m pytest -q "$@" 2>&1 | tee "$LOGS/$stack.log"
    rc=${PIPESTATUS[0]}
    if [[ $rc -eq 0 ]]; then
        stage_done "pytest[$stack]" ok "$t"
    else
        [[ $rc -eq 5 ]] && echo "pytest collected no test on stack $stack: that is a failure here" >&2
        stage_done "pytest[$stack]" "FAIL($rc)" "$t"
    fi
done

# --- UI tests, once per gradio version -------------------------------------------
for ui in ${UI_STAGES-gradio3 gradio4 gradio6}; do
    t=$SECONDS
    case "$ui" in
        gradio3) host=a1111 ;;
        gradio4) host=forge ;;
        gradio6) host=newest ;;
        *) echo "unknown UI stage '$ui' (gradio3, gradio4, gradio6)" >&2; stage_done "ui[$ui]" FAIL "$t"; continue ;;
    esac
    echo "==> UI stage $ui (on the $host stack)"
    overlays=("$ui")
    [[ "$host" != newest ]] && overlays=("$host" "$ui")
    if ! bash .ci/setup.sh "${overlays[@]}"; then stage_done "ui[$ui]" FAIL "$t"; continue; fi
    if [[ "$ui" != gradio3 ]]; then ensure_chromium; fi
    uipath="$ROOT/.ci/envs/$ui"
    [[ "$host" != newest ]] && uipath="$ROOT/.ci/envs/$host:$uipath"
    env PYTHONPATH="$uipath${PYTHONPATH:+:$PYTHONPATH}" LORA_TRAINER_STACK="$host" \
        LORA_TRAINER_UI="$ui" "$PY" -m pytest -q -W ignore::DeprecationWarning tests/ui 2>&1 | tee "$LOGS/ui-$ui.log"
    rc=${PIPESTATUS[0]}
    if [[ $rc -eq 0 ]]; then stage_done "ui[$ui]" ok "$t"; else stage_done "ui[$ui]" "FAIL($rc)" "$t"; fi
done

# --- the pack in a real ComfyUI 0.8.0 and its frontend ------------------------------
for stage in ${COMFYUI_STAGES-comfyui}; do
    t=$SECONDS
    if [[ "$stage" != comfyui ]]; then
        echo "unknown ComfyUI stage '$stage' (comfyui)" >&2; stage_done "$stage" FAIL "$t"; continue
    fi
    echo "==> ComfyUI stage (ComfyUI 0.8.0 --cpu, frontend 1.35.9, on the newest stack)"
    if [[ "$COMFYUI_SETUP" == none ]]; then
        echo "==> ComfyUI stage skipped: no ComfyUI 0.8.0 source (set COMFYUI_SRC to a ComfyUI git dir or source tree)"
        stage_done comfyui skipped "$t"
        continue
    fi
    if [[ "$COMFYUI_SETUP" != ok ]]; then stage_done comfyui FAIL "$t"; continue; fi
    ensure_chromium
    env PYTHONPATH="$ROOT/.ci/envs/comfyui${PYTHONPATH:+:$PYTHONPATH}" LORA_TRAINER_STACK=newest LORA_TRAINER_COMFYUI=1 \
        "$PY" -m pytest -q -W ignore::DeprecationWarning tests/comfyui 2>&1 | tee "$LOGS/comfyui.log"
    rc=${PIPESTATUS[0]}
    if [[ $rc -eq 0 ]]; then stage_done comfyui ok "$t"; else stage_done comfyui "FAIL($rc)" "$t"; fi
done

# --- install.py into a real host environment --------------------------------------
for host in ${INSTALL_STAGES-a1111}; do
    t=$SECONDS
    echo "==> install stage $host"
    if ! bash .ci/setup.sh "$host-host"; then stage_done "install[$host]" FAIL "$t"; continue; fi
    env LORA_TRAINER_HOST_VENV="$ROOT/.ci/envs/$host-host" "$PY" -m pytest -q tests/install 2>&1 |
        tee "$LOGS/install-$host.log"
    rc=${PIPESTATUS[0]}
    if [[ $rc -eq 0 ]]; then stage_done "install[$host]" ok "$t"; else stage_done "install[$host]" "FAIL($rc)" "$t"; fi
done

echo
echo "==> summary (total $((SECONDS - T_START))s)"
printf '    %s\n' "${SUMMARY[@]}"
# One closing line over all stacks, from each pytest run's own closing line.
"$PY" - "$LOGS"/*.log <<'PYEOF' || true
import os, re, sys
total = {"passed": 0, "failed": 0, "skipped": 0}
for path in sys.argv[1:]:
    if not path.endswith(".log") or not os.path.exists(path):  # no pytest stage ran: the glob stays
        continue
    last = ""
    for line in open(path, encoding="utf-8", errors="replace"):
        if re.search(r"\d+ (passed|failed|skipped|errors?|xfailed|xpassed|deselected)\b.* in [\d.]+s", line):
            last = line
    for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)\b", last):
        key = {"error": "failed", "errors": "failed", "xfailed": "skipped", "xpassed": "passed"}.get(word, word)
        total[key] += int(n)
print(f"total: {total['passed']} passed, {total['failed']} failed, {total['skipped']} skipped")
PYEOF
exit "$FAILED"
