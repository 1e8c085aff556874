"""The "kvcache" content view: a routed flow's decision as a table, in mitmweb and mitmproxy.

The data is the flow's `kvcache` metadata (what `Decision.as_metadata` wrote), so a flow
saved with `-w` and loaded again shows the same table. The view is picked by hand from the
view menu (it never takes over a body's default view): on the request or on the response
it renders the same decision, whatever the body.

mitmproxy 11 has `contentviews.View` (a callable returning lines of styled text); 12
replaced it with the `Contentview` protocol (`prettify(data, metadata) -> str`). Both are
served from one renderer.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from mitmproxy import contentviews

NAME = "kvcache"

# With the `kvcache_view_auto` option, the view is the "Auto" choice for routed flows (the
# screenshot script uses it; a user who inspects decisions more than bodies may too).
AUTO = False

_SOURCES = "held: view = what the cache view said; proxy = what this proxy sent there itself"


def render(meta: dict[str, Any] | None) -> list[str]:
    """The decision as lines of text (a table of the candidates, then the decision)."""
    if not meta:
        return ["not routed by kvcache (no kvcache metadata on this flow)"]
    lines = [f"routed to {meta.get('endpoint_id')}: {meta.get('reason')}"
             + (f" (why={meta['why']})" if meta.get("why") else "")]
    n = meta.get("prompt_tokens", 0)
    lines.append(f"matched {meta.get('matched_tokens', 0)} of {n} prompt tokens; tokens from "
                 f"{meta.get('token_source') or '-'}; routing {meta.get('route_ms', 0)} ms"
                 + (f", lookup {meta['lookup_ms']:.2f} ms" if meta.get("lookup_ms")
                    is not None else "")
                 + (f"; budget {meta['budget_ms']:.0f} ms" if meta.get("budget_ms") else "")
                 + (" (a recent answer reused)" if meta.get("answer") == "recent-answer"
                    else ""))
    rows = meta.get("candidates") or []
    if rows:
        head = ["endpoint", "held (view)", "held (proxy)", "load (tokens)", "cost (tokens)",
                ""]
        table = [head] + [[
            str(r.get("endpoint")), str(r.get("held_view", 0)), str(r.get("held_proxy", 0)),
            str(r.get("load_tokens", 0)), str(r.get("cost_tokens", 0)),
            "<- chosen" if r.get("endpoint") == meta.get("endpoint_id") else ""]
            for r in rows]
        widths = [max(len(r[i]) for r in table) for i in range(len(head))]
        lines.append("")
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                  for r in table]
        lines += ["", _SOURCES,
                  "cost = the work before this request's first token there: its uncached "
                  "prompt tokens (weighed up under congestion) + the queued load"]
    else:
        lines.append("no endpoint held any of the prompt: load-balanced")
    return lines


def _priority(flow: Any) -> float:
    # Chosen by hand only, unless asked to be the default for routed flows.
    return 10.0 if AUTO and _meta_of(flow) else 0.0


def _meta_of(flow: Any) -> dict[str, Any] | None:
    return getattr(flow, "metadata", {}).get("kvcache") if flow is not None else None


if hasattr(contentviews, "Contentview"):  # mitmproxy 12 and later
    class DecisionView:  # the Contentview protocol
        name = NAME
        syntax_highlight = "none"

        def prettify(self, data: bytes, metadata: Any) -> str:
            return "\n".join(render(_meta_of(getattr(metadata, "flow", None))))

        def render_priority(self, data: bytes, metadata: Any) -> float:
            return _priority(getattr(metadata, "flow", None))
else:
    from mitmproxy.contentviews.base import TViewResult, View

    class DecisionView(View):  # type: ignore[no-redef]
        name = NAME

        def __call__(self, data: bytes, *, flow: Any = None, **unknown: Any) -> TViewResult:
            def lines() -> Iterator[list[tuple[str, str]]]:
                for line in render(_meta_of(flow)):
                    yield [("text", line)]
            return "kvcache routing decision", lines()

        def render_priority(self, data: bytes, **metadata: Any) -> float:
            return _priority(metadata.get("flow"))


VIEW = DecisionView()


def register() -> None:
    """Add the view (once: a script reload registers the new module's view instead)."""
    old = contentviews.get(NAME)
    if old is not None:
        contentviews.remove(old)
    contentviews.add(VIEW)  # type: ignore[arg-type]


def unregister() -> None:
    if contentviews.get(NAME) is VIEW:
        contentviews.remove(VIEW)  # type: ignore[arg-type]
