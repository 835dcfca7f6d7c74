"""`POST /lora_trainer/train`, `GET /lora_trainer/status`, `POST /lora_trainer/cancel`, `GET`/`POST
/lora_trainer/queue` for scripted use.

Behind the same HTTP basic auth as the WebUI's own API when `--api-auth user:pass[,user2:pass2]` is
set (modules/api/api.py checks it the same way: every credential pair, compared in constant time).
"""

from __future__ import annotations

import secrets
from typing import Any, Dict, Optional

from lora_trainer.errors import ConfigError, LoraTrainerError
from lora_trainer.ui.queue_panel import listing, public, queue_run
from lora_trainer.ui.session import TrainSession, form_to_config, start_run

_TEXT_FIELDS = ("name", "folder", "base_model", "trigger_word", "preset")


def _credentials(api_auth: Optional[str]) -> Dict[str, str]:
    pairs = {}
    for item in (api_auth or "").split(","):
        user, sep, password = item.strip().partition(":")
        if sep:
            pairs[user] = password
    return pairs


def check_auth(api_auth: Optional[str], username: str, password: str) -> bool:
    """True when no --api-auth is set or the pair matches one of its credentials."""
    pairs = _credentials(api_auth)
    if not pairs:
        return True
    expected = pairs.get(username)
    return expected is not None and secrets.compare_digest(password, expected)


def body_config(body: Dict[str, Any], backend: Any) -> Any:
    """A run's config from a JSON body: name, folder, base_model (default: the selected checkpoint), trigger_word,
    preset, low_vram, options (config keys over the preset's values), checked as the tab checks its form."""
    for key in _TEXT_FIELDS:
        if not isinstance(body.get(key) or "", str):
            raise ConfigError(f"{key}: give a string, not {type(body[key]).__name__} {body[key]!r}.")
    if not isinstance(body.get("options") or {}, dict):
        raise ConfigError("options: give an object of config keys and values, e.g. {\"epochs\": 10}.")
    base_model = backend.resolve_base_model(body.get("base_model") or backend.default_base_model())
    return form_to_config(body.get("name", ""), body.get("folder", ""), base_model, body.get("trigger_word", ""),
                          body.get("preset") or "style", bool(body.get("low_vram", False)), body.get("options") or {},
                          backend.output_root())


def start_training(body: Dict[str, Any], backend: Any) -> Dict[str, Any]:
    """Start a run from a JSON body (see `body_config`)."""
    start_run(backend, body_config(body, backend))
    return status()


def queue_training(body: Dict[str, Any], backend: Any) -> Dict[str, Any]:
    """Queue a run from the same body as /lora_trainer/train; the runner starts if it is idle."""
    job = queue_run(backend, body_config(body, backend))
    return {"queued": public(job), **listing(backend)}


def status() -> Dict[str, Any]:
    s = TrainSession.current
    if s is None:
        return {"running": False, "message": "no run yet"}
    r = s.result
    return {"running": s.running, "task_id": s.task_id, "message": s.summary(), "step": s.callbacks.step,
            "total": s.callbacks.total, "losses": s.callbacks.losses[-200:], "error": s.error,
            "lora_path": str(r.lora_path) if r is not None and r.lora_path else None,
            "stopped": bool(r.stopped) if r is not None else False}


def cancel() -> Dict[str, Any]:
    s = TrainSession.current
    if s is not None and s.running:
        s.stop()
    return status()


def mount(app: Any, backend: Any, api_auth: Optional[str]) -> None:
    """Add the routes to the WebUI's FastAPI app (called from on_app_started)."""
    from fastapi import Depends, HTTPException
    from fastapi.security import HTTPBasic

    basic = HTTPBasic(auto_error=bool(_credentials(api_auth)))

    def auth(credentials=Depends(basic)) -> None:  # HTTPBasicCredentials (unannotated: imported locally)
        if not _credentials(api_auth):
            return
        if credentials is None or not check_auth(api_auth, credentials.username, credentials.password):
            raise HTTPException(status_code=401, detail="Incorrect username or password",
                                headers={"WWW-Authenticate": "Basic"})

    def train_route(body: Dict[str, Any]) -> Dict[str, Any]:
        try:
            return start_training(body, backend)
        except LoraTrainerError as e:
            raise HTTPException(status_code=400, detail=str(e)) from None

    def queue_add_route(body: Dict[str, Any]) -> Dict[str, Any]:
        try:
            return queue_training(body, backend)
        except LoraTrainerError as e:
            raise HTTPException(status_code=400, detail=str(e)) from None

    def queue_route() -> Dict[str, Any]:  # every run (id, name, state, step, total, output_dir, lora, error)
        return listing(backend)

    deps = [Depends(auth)]
    app.add_api_route("/lora_trainer/train", train_route, methods=["POST"], dependencies=deps)
    app.add_api_route("/lora_trainer/status", status, methods=["GET"], dependencies=deps)
    app.add_api_route("/lora_trainer/cancel", cancel, methods=["POST"], dependencies=deps)
    app.add_api_route("/lora_trainer/queue", queue_route, methods=["GET"], dependencies=deps)
    app.add_api_route("/lora_trainer/queue", queue_add_route, methods=["POST"], dependencies=deps)
