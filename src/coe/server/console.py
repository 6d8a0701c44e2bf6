"""The web console: ``GET /ui`` (one page shipped in the package, no CDN, no build step) and the
small JSON routes it reads besides the OpenAI API: recent routing decisions and the cache actions
(pin, unpin, prefetch)."""

from __future__ import annotations

import asyncio
from importlib import resources

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, RedirectResponse

from coe.engine import Engine
from coe.errors import InvalidRequest, UnknownExpert
from coe.server.shapes import expert_json
from coe.types import Tier

DEFAULT_WINDOW_S = 600.0
MAX_WINDOW_S = 24 * 3600.0
TIERS = ("device", "host")


def page_html() -> str:
    return resources.files("coe.server").joinpath("console/index.html").read_text(encoding="utf-8")


def install_console(app: FastAPI, engine: Engine) -> None:
    @app.get("/", include_in_schema=False)
    async def root():
        return RedirectResponse("/ui")

    @app.get("/ui", include_in_schema=False)
    async def console():
        return HTMLResponse(page_html(), headers={"Cache-Control": "no-store"})

    @app.get("/v1/routing")
    async def routing(window_s: float = DEFAULT_WINDOW_S):
        """Decisions of model "coe" per category and expert in the last ``window_s`` seconds, the
        category-to-expert map and the budget it was chosen under."""
        if not 0 < window_s <= MAX_WINDOW_S:
            raise InvalidRequest(
                f"window_s must be in (0, {MAX_WINDOW_S:.0f}], got {window_s}", param="window_s"
            )
        router = engine.routing.router
        return {
            "window_s": window_s,
            "decisions": engine.routing.recent_decisions(window_s),
            "routed": router is not None,
            "map": dict(router.assignment) if router else None,
            "budget_params": engine.config.router.budget_params,
            "plan": (
                {
                    "expected_score": router.plan.expected_score,
                    "avg_active_params": router.plan.avg_active_params,
                }
                if router and router.plan
                else None
            ),
            "scores_source": router.score_source if router else None,
            "unavailable_reason": engine.routing.router_error,
        }

    @app.post("/v1/experts/{name}/pin")
    async def pin(name: str):
        """Make the expert hot and keep it there (it is never evicted until unpinned)."""
        _local(engine, name)
        await asyncio.to_thread(engine.cache.pin, name)
        return await asyncio.to_thread(_state, engine, name)

    @app.post("/v1/experts/{name}/unpin")
    async def unpin(name: str):
        _local(engine, name)
        await asyncio.to_thread(engine.cache.unpin, name)
        return await asyncio.to_thread(_state, engine, name)

    @app.post("/v1/experts/{name}/prefetch")
    async def prefetch(name: str, tier: str = "device"):
        """Start moving the expert up to ``tier`` (device or host); returns at once."""
        _local(engine, name)
        if tier not in TIERS:
            raise InvalidRequest(
                f"tier must be one of {', '.join(TIERS)}, got {tier!r}", param="tier"
            )
        engine.cache.prefetch(name, Tier(tier))
        return await asyncio.to_thread(_state, engine, name)


def _local(engine: Engine, name: str) -> None:
    """An expert whose weights this process holds (the tier routes act on those only)."""
    names = [e.name for e in engine.config.experts]
    if name not in names:
        raise UnknownExpert(f"no expert named {name!r}; experts: {', '.join(names)}", param="name")
    if name in engine.remotes:
        raise InvalidRequest(
            f"{name} runs outside this server ({engine.remotes[name].kind}): it has no "
            f"weights here to move or pin",
            param="name",
        )


def _state(engine: Engine, name: str) -> dict:
    return expert_json(engine.cache.state_of(name))
