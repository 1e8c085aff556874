"""``scripts/doctor``: say, in plain words, what will stop cache-aware routing from working.

Point it at a config (``--config config.yaml``; the controller, endpoints, tokenizer and
model come from there, each overridable by a flag) and it checks, in order:

1. the controller answers ``/lookup``, in a shape the addon reads, and which LMCache
   version that shape belongs to (0.5.x arrays, Pixiu's mock objects, 0.3.0 bodies);
2. the instance ids the controller knows equal the configured endpoint ids (otherwise a
   match names an instance no endpoint has, and no request is ever routed by cache);
3. ``/tokenize`` answers for the model (the addon needs the prompt's tokens);
4. a real prompt, tokenized by the engine and served once (``--no-warmup`` to skip), is
   then found by ``/lookup`` (if not, controller and workers hash chunks differently:
   the PYTHONHASHSEED pitfall), and is at least one 256-token chunk long;
5. the cache-management settings: ``/evict`` (absent from every LMCache release) and
   ``compress_method`` (workers only know cachegen).

When the URL serves LMCache's MP coordinator instead (the doctor probes it, and says so in
one line if the config's ``cache_view`` names the other; ``--cache-view coordinator`` skips
the probe), the same questions are asked of it:
``/healthz``; the instances it knows (registered, or reporting cache events) against the
endpoint ids; the chunk size it cuts prompts into; a served probe prompt found by
``/directory/lookup`` under the configured model (and, if not, under which model names the
directory does hold keys); and which cache actions it can take (delete, fleet pins; no
compress or clear).

Exit status: 0 when routing can work (warnings allowed), 1 when it cannot, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import httpx

from addon.config import ConfigError, KVCacheConfig, load_config_file
from addon.coordinator import Coordinator, probe_view
from addon.lmcache import LMCache, LookupResult, parse_lookup
from addon.resilience import StatusError, UnparsableResponse

CHUNK = 256
Status = Literal["ok", "info", "warn", "fail"]

# Long enough (~400 tokens with any real tokenizer) to fill at least one 256-token chunk.
DEFAULT_PROMPT = " ".join(
    [
        "You are a careful assistant for an engineering team that runs language models",
        "behind a caching proxy. The proxy sends each request to the server that already",
        "holds the longest part of its prompt in its key-value cache, so that the server",
        "can skip recomputing it. This paragraph is only a probe sent by the doctor: it is",
        "long enough to fill more than one cache chunk of two hundred and fifty-six tokens,",
        "and the same text is looked up afterwards to see whether the cache controller",
        "reports it.",
    ]
    * 4
)


@dataclass
class Check:
    name: str
    status: Status
    message: str
    fix: str = ""
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Target:
    controller: str
    endpoints: dict[str, str]  # id -> base URL
    tokenizer: str
    model: str
    config: KVCacheConfig | None
    view: str = "controller"  # or "coordinator": what the controller URL serves


class Doctor:
    def __init__(self, target: Target, prompt: str, *, warmup: bool, timeout: float,
                 settle: float, prompt_given: bool) -> None:
        self.t = target
        self.prompt = prompt
        self.prompt_given = prompt_given
        self.warmup = warmup
        self.timeout = timeout
        self.settle = settle
        self.checks: list[Check] = []
        self.http = httpx.Client(timeout=timeout)
        self.lm = LMCache(target.controller)

    def add(self, name: str, status: Status, message: str, fix: str = "",
            **data: Any) -> Check:
        c = Check(name, status, message, fix, data)
        self.checks.append(c)
        return c

    def close(self) -> None:
        self.http.close()
        self.lm.close()

    # -- the checks --

    def run(self) -> list[Check]:
        shape = self.check_controller()
        known: set[str] | None = None
        if shape is not None:
            known = self.check_instances(shape)
        tokens = self.check_tokenize()
        # With no worker registered every lookup is empty: that is already a FAIL.
        if shape is not None and tokens is not None and known != set():
            self.check_lookup(tokens, known)
        if shape is not None:
            self.check_management(shape)
        return self.checks

    def _post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        return self.http.post(self.t.controller + path, json=body)

    def check_controller(self) -> str | None:
        """Returns the shape's version label, or None when the controller is unusable."""
        url = self.t.controller
        try:
            r = self._post("/lookup", {"tokens": list(range(1000, 1000 + CHUNK))})
        except httpx.TimeoutException:
            self.add("controller", "fail", f"The LMCache controller at {url} did not answer "
                     f"/lookup within {self.timeout:g} s.",
                     "Check that lmcache_controller runs there and is not stalled; every "
                     "lookup would time out and no request would be routed by cache.")
            return None
        except httpx.HTTPError as e:
            self.add("controller", "fail", f"Cannot reach the LMCache controller at {url} "
                     f"({type(e).__name__}: {e}).",
                     "Start it (lmcache_controller --host H --port P --monitor-ports "
                     "'{\"pull\": X, \"reply\": Y}') or fix lmcache_endpoint / --controller.")
            return None
        if r.status_code != 200:
            hint = " (no /lookup route: this is not an LMCache controller)" \
                if r.status_code == 404 else ""
            self.add("controller", "fail", f"The controller at {url} answered /lookup with "
                     f"HTTP {r.status_code}{hint}: {r.text[:160]!r}.",
                     "Point lmcache_endpoint at the controller's HTTP API (--port of "
                     "lmcache_controller).")
            return None
        try:
            body = r.json()
        except ValueError:
            self.add("controller", "fail", f"The controller at {url} answered /lookup with "
                     f"something that is not JSON: {r.text[:80]!r}.",
                     "A proxy or another service may be answering on that port.")
            return None
        try:
            parse_lookup(body)
        except UnparsableResponse as e:
            self.add("controller", "fail", f"The controller's /lookup answer has a shape the "
                     f"addon cannot read ({e}): {json.dumps(body)[:160]}.",
                     "Use LMCache >= 0.3.13 (0.5.x recommended).", body=body)
            return None
        version = "0.3.0" if "event_id" not in body else "0.5.x"
        if version == "0.3.0":
            self.add("controller", "warn", f"The controller at {url} answers with LMCache "
                     "0.3.0 bodies (no event_id). Lookups are read, so routing works, but "
                     "/pin and /clear take a `locations` list there, /compress always fails "
                     "and no answer carries num_tokens: pinning and compression do nothing "
                     "useful.", "Upgrade LMCache to 0.5.x.", version=version)
        else:
            self.add("controller", "ok", f"The controller at {url} answers /lookup "
                     "(LMCache 0.5.x bodies with event_id).", version=version)
        return version

    def _known_instances(self) -> tuple[set[str] | None, str]:
        """Instance ids the controller knows, and how that was found out."""
        found: set[str] = set()
        how = "/health per configured id"
        # GET /controller/workers reads the registry as it is now; /query_worker_info "all"
        # is a cache refreshed about every 30 s (an instance that registered since is
        # missing), and 0.3.0 has neither. /health then covers each configured id.
        r = self.http.get(self.t.controller + "/controller/workers")
        if r.status_code == 200 and isinstance(r.json().get("workers"), list):
            found = {str(w.get("instance_id")) for w in r.json()["workers"]}
            how = "/controller/workers"
        else:
            r = self._post("/query_worker_info", {"instance_id": "all", "worker_ids": None})
            if r.status_code == 200 and isinstance(r.json().get("worker_infos"), list):
                found = {str(w.get("instance_id")) for w in r.json()["worker_infos"]}
                how = "/query_worker_info"
        for iid in self.t.endpoints:
            if iid in found:
                continue
            # Asking about one instance reads the registry directly (the lists above are
            # cached for ~30 s in 0.5.6) and, unlike /health, never waits on its worker.
            q = self._post("/query_worker_info", {"instance_id": iid, "worker_ids": None})
            if q.status_code == 200:
                if q.json().get("worker_infos"):
                    found.add(iid)
                continue
            h = self._post("/health", {"instance_id": iid})
            if h.status_code != 200:
                continue
            data = h.json()
            if data.get("error_codes") or data.get("alive") is True:
                found.add(iid)
        return found, how

    def check_instances(self, version: str) -> set[str] | None:
        try:
            known, how = self._known_instances()
        except (httpx.HTTPError, ValueError, AttributeError) as e:
            self.add("instance_ids", "warn", f"Could not ask the controller which instances "
                     f"it knows ({type(e).__name__}: {e}).")
            return None
        assert known is not None
        configured = list(self.t.endpoints)
        matching = [i for i in configured if i in known]
        unknown = [i for i in configured if i not in known]
        extra = sorted(known - set(configured))
        data = {"configured": configured, "known": sorted(known), "source": how}
        if not known:
            self.add("instance_ids", "fail", "No LMCache worker is registered with the "
                     "controller, so every lookup is empty and no request is routed by cache.",
                     "Start vLLM with the LMCache connector and controller enabled "
                     "(enable_controller: true, lmcache_instance_id, controller_pull_url / "
                     "controller_reply_url = the controller's --monitor-ports).", **data)
            return known
        if not matching:
            self.add("instance_ids", "fail",
                     "Endpoint ids do not match the controller's instance ids: the controller "
                     f"knows {_names(sorted(known))}; the config's endpoints are "
                     f"{_names(configured)}. A lookup names the instance that holds a prefix "
                     "and no endpoint has that id, so no request is ever routed by cache.",
                     "Set each endpoint's `id` to its vLLM server's lmcache_instance_id "
                     f"(e.g. id: {sorted(known)[0]}). The controller's list of all workers "
                     "is cached for ~30 s: a server that just registered may be missing.",
                     **data)
            return known
        if unknown:
            self.add("instance_ids", "warn", f"Endpoint(s) {_names(unknown)} are not known to "
                     "the controller: requests are never routed to them by cache (only by "
                     f"load balancing). The controller knows {_names(sorted(known))}.",
                     "Set those endpoints' `id` to their servers' lmcache_instance_id, or "
                     "enable the LMCache controller on those servers.", **data)
        else:
            self.add("instance_ids", "ok", f"Every endpoint id is a controller instance id "
                     f"({_names(configured)}).", **data)
        if extra:
            self.add("instance_ids_extra", "info", f"The controller also knows "
                     f"{_names(extra)}, which no endpoint names: their caches are never used "
                     "for routing.", **data)
        return known

    def check_tokenize(self) -> list[int] | None:
        url, model = self.t.tokenizer, self.t.model
        body: dict[str, Any] = {"prompt": self.prompt}
        if model:
            body["model"] = model
        try:
            r = self.http.post(f"{url}/tokenize", json=body)
        except httpx.HTTPError as e:
            self.add("tokenize", "fail", f"Cannot reach {url}/tokenize ({type(e).__name__}: "
                     f"{e}). The addon needs the prompt's tokens to look it up, so no "
                     "request is routed by cache.",
                     "Set vllm_endpoint (or --tokenizer) to a running vLLM server.")
            return None
        if r.status_code == 404:
            detail = _vllm_error(r)
            if "model" in detail.lower():
                models = self._models(url)
                self.add("tokenize", "fail", f"{url}/tokenize does not know the model "
                         f"{model!r} (404: {detail}). Every tokenization fails, so no request "
                         "is routed by cache.",
                         f"Set default_model (or --model) to one of {_names(models)}."
                         if models else "Set default_model (or --model) to the served model.",
                         models=models)
            else:
                self.add("tokenize", "fail", f"{url} has no /tokenize (404). Is this a vLLM "
                         "server?", "Point vllm_endpoint at a vLLM OpenAI server.")
            return None
        if r.status_code != 200:
            self.add("tokenize", "fail", f"{url}/tokenize answered HTTP {r.status_code}: "
                     f"{_vllm_error(r) or r.text[:160]!r}.")
            return None
        try:
            tokens = r.json()["tokens"]
            if not all(isinstance(t, int) for t in tokens):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            self.add("tokenize", "fail", f"{url}/tokenize answered without a token list.")
            return None
        self.add("tokenize", "ok", f"{url}/tokenize answers ({len(tokens)} tokens for the "
                 f"probe prompt{f', model {model}' if model else ''}).", tokens=len(tokens))
        if len(tokens) < CHUNK:
            who = "Your prompt" if self.prompt_given else "The probe prompt"
            self.add("prompt_length", "warn", f"{who} is {len(tokens)} tokens: prompts "
                     f"shorter than {CHUNK} tokens never match (LMCache caches and looks up "
                     f"whole {CHUNK}-token chunks), so they are never routed by cache.",
                     "Expect cache routing only for long shared prefixes (system prompts, "
                     "documents, conversations).", tokens=len(tokens))
        return tokens

    def _models(self, url: str) -> list[str]:
        try:
            data = self.http.get(f"{url}/v1/models").json()["data"]
            return [str(m["id"]) for m in data]
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return []

    def _warm(self, known: set[str] | None) -> str | None:
        """Serve the prompt once on a configured endpoint the controller knows."""
        # Prefer an endpoint the controller knows; with none (an id mismatch) any endpoint
        # still shows under which id its server stores the prompt.
        ids = [i for i in self.t.endpoints if known is not None and i in known]
        iid = (ids or list(self.t.endpoints))[0]
        body: dict[str, Any] = {"prompt": self.prompt, "max_tokens": 1}
        if self.t.model:
            body["model"] = self.t.model
        try:
            r = self.http.post(f"{self.t.endpoints[iid]}/v1/completions", json=body,
                               timeout=max(self.timeout, 30.0))
        except httpx.HTTPError as e:
            self.add("warmup", "warn", f"Could not send the probe prompt to {iid} "
                     f"({type(e).__name__}: {e}).")
            return None
        if r.status_code != 200:
            self.add("warmup", "warn", f"{iid} answered the probe prompt with HTTP "
                     f"{r.status_code}: {_vllm_error(r) or r.text[:120]!r}.")
            return None
        return iid

    def _settled_lookup(
        self, lookup: Callable[[list[int], float], LookupResult], path: str,
        tokens: list[int], known: set[str] | None,
    ) -> tuple[str | None, str | None, LookupResult] | None:
        """Serve the probe prompt once (unless --no-warmup), then look it up until the cache
        view reports it or `settle` seconds pass (LMCache workers and MP servers report their
        chunks a moment after storing them): (the endpoint that served it, the instance whose
        match is awaited, the last answer); None when the lookup failed (said as a FAIL)."""
        served = self._warm(known) if self.warmup else None
        # The served endpoint's id is its instance id only if the cache view knows it (an
        # id mismatch hides under which id the prompt got stored).
        target = served if served and known and served in known else None
        deadline = time.monotonic() + (self.settle if served else 0.0)
        while True:
            try:
                res = lookup(tokens, self.timeout)
            except (httpx.HTTPError, StatusError, UnparsableResponse) as e:
                self.add("lookup", "fail", f"{path} with the prompt's {len(tokens)} tokens "
                         f"failed ({type(e).__name__}: {e}).")
                return None
            # After a warm-up only the served instance's match tells whether its hashes
            # agree with the cache view's; others may hold the prompt from earlier runs.
            done = (target in res.matches) if target else bool(res.matches)
            if done or time.monotonic() >= deadline:
                return served, target, res
            time.sleep(0.1)

    def _say_found(self, res: LookupResult, target: str | None, what: str,
                   holder: Callable[[str, int], str]) -> bool:
        """When the probe lookup found the prompt (on `target`, if one is awaited): one OK
        line naming every holder (a WARN if the best one is no configured endpoint)."""
        if not res.matches or (target and target not in res.matches):
            return False
        best = max(res.matches, key=lambda i: res.matches[i])
        routable = best in self.t.endpoints
        self.add("lookup", "ok" if routable else "warn",
                 f"{what} matches "
                 + ", ".join(holder(i, n) for i, n in sorted(res.matches.items()))
                 + ("" if routable else f"; {best} is no configured endpoint"),
                 matches=res.matches)
        return True

    def check_lookup(self, tokens: list[int], known: set[str] | None) -> None:
        if len(tokens) < CHUNK:
            return
        found = self._settled_lookup(self.lm.lookup, "/lookup", tokens, known)
        if found is None:
            return
        served, target, res = found
        if self._say_found(res, target, f"A lookup of the {len(tokens)}-token prompt",
                           lambda i, n: f"{i}: {n} tokens"):
            self._layout_note(tokens)
            return
        if served:
            where = ("nowhere" if not res.matches else "only on " + ", ".join(sorted(res.matches))
                     + " (which held it before)")
            self.add("lookup", "fail", f"The probe prompt ({len(tokens)} tokens) was served "
                     f"by {served}, yet /lookup finds it {where} after {self.settle:g} s. The "
                     "workers register and report chunks, but the controller hashes the "
                     "tokens differently: a chunk-hash seed mismatch (PYTHONHASHSEED differs "
                     "between the controller and the vLLM servers), or the servers do not "
                     "store to LMCache. Every lookup will come back empty.",
                     "Start lmcache_controller and every vLLM server with the same "
                     "PYTHONHASHSEED (e.g. export PYTHONHASHSEED=0) and the same "
                     "pre_caching_hash_algorithm; check that vLLM runs the LMCache connector.",
                     tokens=len(tokens))
        elif self.warmup:
            pass  # _warm has said why the prompt could not be served
        else:
            self.add("lookup", "info", f"No instance holds the {len(tokens)}-token probe "
                     "prompt (it was not sent: --no-warmup). Whether hashes agree is "
                     "untested.", "Run without --no-warmup to serve it once and look again.",
                     tokens=len(tokens))

    def _layout_note(self, tokens: list[int]) -> None:
        try:
            body = self._post("/lookup", {"tokens": tokens}).json()
            value = next(iter(body["layout_info"].values()))
        except (httpx.HTTPError, ValueError, KeyError, StopIteration):
            return
        if isinstance(value, dict):
            self.add("layout", "warn", "layout_info values are objects {\"0\": location, "
                     "\"1\": tokens}: the shape of Pixiu's sample mock, not of any LMCache "
                     "release (which sends arrays). The addon reads both.",
                     "If this is the Pixiu mock, switch to a real lmcache_controller.",
                     layout="object")
        else:
            self.add("layout", "ok", "layout_info values are [location, tokens] arrays "
                     "(LMCache 0.5.x).", layout="array")

    def check_management(self, version: str) -> None:
        cfg = self.t.config
        strategy = cfg.cache_strategy if cfg else None
        try:
            has_evict = self.lm.has_evict(self.timeout)
        except (httpx.HTTPError, StatusError) as e:
            self.add("evict", "warn", f"Could not probe /evict ({type(e).__name__}: {e}).")
            has_evict = None
        if has_evict is False:
            if strategy and strategy.enable_eviction and not strategy.eviction_clear_fallback:
                self.add("evict", "warn", "enable_eviction is on, but the controller has no "
                         "/evict (no LMCache release has one): nothing will ever be evicted.",
                         "Set cache_strategy.eviction_clear_fallback: true to use /clear "
                         "instead (drops everything at that location), or turn eviction off.")
            else:
                self.add("evict", "info", "The controller has no /evict (as in every LMCache "
                         "release); the addon does not need it with this config.")
        elif has_evict:
            self.add("evict", "ok", "The controller serves /evict (a Pixiu-mock extension).")
        if strategy and strategy.compress_method != "cachegen":
            self.add("compress_method", "warn" if strategy.enable_compression else "info",
                     f"compress_method is {strategy.compress_method!r}: LMCache workers only "
                     "implement 'cachegen'; any other method compresses 0 tokens.",
                     "Set cache_strategy.compress_method: cachegen.")


class CoordinatorDoctor(Doctor):
    """The doctor's questions asked of an LMCache MP coordinator (addon/coordinator.py)."""

    def __init__(self, target: Target, prompt: str, *, kv_model: str, chunk_size: int,
                 world_size: int = 1, cache_salt: str = "", **kw: Any) -> None:
        super().__init__(target, prompt, **kw)
        self.kv_model = kv_model
        self.chunk = chunk_size
        self.co_world_size = world_size
        self.co_salt = cache_salt
        self.co = Coordinator(target.controller, kv_model, world_size=world_size,
                              cache_salt=cache_salt, chunk_size=chunk_size)

    def close(self) -> None:
        super().close()
        self.co.close()

    def run(self) -> list[Check]:
        up = self.check_coordinator()
        if up and not self.kv_model:
            self.add("model", "fail", "No model name is configured: every coordinator key "
                     "hashes the model name, so the addon cannot look anything up.",
                     "Set default_model (or --cache-model) to the model name vLLM passes to "
                     "LMCache.")
            up = False
        known: set[str] | None = None
        if up:
            known = self.check_coordinator_instances()
            self.check_chunk_size()
        tokens = self.check_tokenize()
        found: bool | None = None
        if up and tokens is not None and known != set():
            found = self.check_directory_lookup(tokens, known)
        if up:
            # A prompt that was served but not found: say under what it was stored.
            self.check_model(tokens if found is False else None)
            self.check_actions()
        return self.checks

    def check_coordinator(self) -> bool:
        url = self.t.controller
        try:
            healthy = self.co.healthz(self.timeout)
        except httpx.TimeoutException:
            self.add("coordinator", "fail", f"The MP coordinator at {url} did not answer "
                     f"/healthz within {self.timeout:g} s.",
                     "Check that `lmcache coordinator` runs there and is not stalled.")
            return False
        except (httpx.HTTPError, StatusError, UnparsableResponse) as e:
            self.add("coordinator", "fail", f"Cannot reach the MP coordinator at {url} "
                     f"({type(e).__name__}: {e}).",
                     "Start it (python -m lmcache.v1.mp_coordinator --host H --port P) or fix "
                     "lmcache_endpoint / --controller.")
            return False
        if not healthy:
            self.add("coordinator", "fail", f"{url}/healthz does not say healthy.",
                     "Check the coordinator's log.")
            return False
        self.add("coordinator", "ok", f"The MP coordinator at {url} answers /healthz.")
        return True

    def check_coordinator_instances(self) -> set[str] | None:
        try:
            registered = set(self.co.instances(self.timeout))
            reporting = set(self.co.stats(self.timeout).get("l1_keys_by_instance") or {})
        except (httpx.HTTPError, StatusError, UnparsableResponse) as e:
            self.add("instance_ids", "warn", f"Could not ask the coordinator which instances "
                     f"it knows ({type(e).__name__}: {e}).")
            return None
        # Lookups name whoever reported a placement; deletes need a registration. Either
        # makes the id one the coordinator knows.
        known = registered | reporting
        configured = list(self.t.endpoints)
        missing = [i for i in configured if i not in known]
        extra = sorted(known - set(configured))
        data = {"configured": configured, "registered": sorted(registered),
                "reporting": sorted(reporting), "known": sorted(known)}
        line = (f"missing (configured, unknown to the coordinator): {_names(missing)}; "
                f"extra (known, no endpoint): {_names(extra)}.")
        fix = ("Set each endpoint's `id` to its LMCache MP server's --instance-id (the "
               "default is a random UUID, so set it explicitly).")
        if not known:
            self.add("instance_ids", "fail", "No MP server has registered with the "
                     "coordinator or reported cache events to it, so every lookup is empty.",
                     "Start each vLLM server's LMCache MP server with --coordinator-url "
                     f"{self.t.controller} --coordinator-event-reporting and a fixed "
                     "--instance-id.", **data)
        elif len(missing) == len(configured):
            self.add("instance_ids", "fail", "Endpoint ids do not match the coordinator's "
                     f"instance ids: {line} No request is ever routed by cache.", fix, **data)
        elif missing:
            self.add("instance_ids", "warn", f"Endpoint ids and coordinator instances "
                     f"differ: {line}", fix, **data)
        else:
            self.add("instance_ids", "ok", f"Every endpoint id is a coordinator instance "
                     f"({_names(configured)})"
                     + (f"; it also knows {_names(extra)}." if extra else "."), **data)
        silent = [i for i in configured if i in registered and i not in reporting]
        unregistered = [i for i in configured if i in reporting and i not in registered]
        if unregistered:
            self.add("instances_registered", "warn", "Reporting cache events but not "
                     f"registered: {_names(unregistered)}. A targeted delete (eviction) on "
                     "them answers 404.", "Give their MP servers --coordinator-url so they "
                     "register and heartbeat.", **data)
        if silent:
            self.add("instances_reporting", "info", "Registered but holding no L1 keys in "
                     f"the directory yet: {_names(silent)} (idle, or started without "
                     "--coordinator-event-reporting).", **data)
        return known

    def check_chunk_size(self) -> None:
        # Fresh tokens: a sequence nothing stored, so only the chunk arithmetic answers.
        base = uuid.uuid4().int % 1_000_000 * 1000 + 10_000
        n = 4 * self.chunk + self.chunk // 2
        try:
            r = self.http.post(self.t.controller + "/directory/lookup", json={
                "token_ids": list(range(base, base + n)), "model_name": self.kv_model or "x"})
            chunks = r.json()["chunks"]
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
            self.add("chunk_size", "warn", f"Could not check the coordinator's chunk size "
                     f"({type(e).__name__}: {e}).")
            return
        if chunks == 4:
            self.add("chunk_size", "ok", f"The coordinator cuts prompts into {self.chunk}-token "
                     "chunks, as configured.", chunk_size=self.chunk)
            return
        guess = n // chunks if chunks else n + 1
        self.add("chunk_size", "warn", f"The coordinator cut {n} tokens into {chunks} chunks: "
                 f"its --chunk-size is about {guess if chunks else f'over {n}'}, not "
                 f"{self.chunk}. Matches are still counted right (chunks carry their tokens), "
                 "but prompts shorter than its chunk never match.",
                 "Run the coordinator and every MP server with the same --chunk-size and set "
                 "the addon's chunk size to it.", chunks=chunks, tokens=n)

    def check_directory_lookup(self, tokens: list[int], known: set[str] | None) -> bool | None:
        """True: the prompt was found; False: served and not found; None: not tested."""
        if len(tokens) < self.chunk:
            return None
        found = self._settled_lookup(self.co.lookup, "/directory/lookup", tokens, known)
        if found is None:
            return None
        served, target, res = found
        if self._say_found(res, target, f"A lookup of the {len(tokens)}-token prompt (model "
                           f"{self.kv_model!r})",
                           lambda i, n: f"{i}: {n} tokens ({res.locations.get(i, '?')})"):
            return True
        if served:
            self.add("lookup", "fail", f"The probe prompt ({len(tokens)} tokens) was served "
                     f"by {served}, yet the coordinator's directory has no placement for it "
                     f"under model {self.kv_model!r} after {self.settle:g} s: its MP server does "
                     "not report cache events here, or stores under another model name, "
                     "cache salt, world size, chunk size or hash algorithm.",
                     "Start the MP servers with --coordinator-event-reporting, the same "
                     "--chunk-size/--hash-algorithm as the coordinator, and set the addon's "
                     "model to the name vLLM passes to LMCache (see the model line below).",
                     tokens=len(tokens))
            return False
        if not self.warmup:
            self.add("lookup", "info", f"No instance holds the {len(tokens)}-token probe "
                     "prompt (it was not sent: --no-warmup). Whether keys agree is untested.",
                     "Run without --no-warmup to serve it once and look again.",
                     tokens=len(tokens))
        return None

    def _prompt_rows(self, tokens: list[int], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The directory rows of the prompt's chunks under ANY model, salt or world size: a
        chunk hash depends on the tokens only, the rest of the key is what a lookup names."""
        try:
            r = self.http.post(self.t.controller + "/directory/lookup", json={
                "token_ids": tokens, "model_name": self.kv_model})
            hashes = {x["key"]["chunk_hash_hex"] for x in r.json()["results"]}
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return []
        return [row for row in rows if row["key"].get("chunk_hash_hex") in hashes]

    def _stored_under(self, prompt_rows: list[dict[str, Any]], data: dict[str, Any]) -> None:
        """One FAIL naming the key field the served prompt was stored under differently."""
        key = prompt_rows[0]["key"]
        holders = sorted({str(p.get("instance_id")) for row in prompt_rows
                          for p in row.get("placements", []) if isinstance(p, dict)})
        by = f" (held by {_names(holders)})" if holders else ""
        model, salt = key.get("model_name"), key.get("cache_salt", "")
        if model != self.kv_model:
            self.add("model", "fail", f"The probe prompt's chunks are in the directory under "
                     f"model {model!r}{by}, not {self.kv_model!r}, the model the addon looks up "
                     "with: keys hash the model name, so every lookup comes back empty.",
                     f"Set the addon's coordinator model (--cache-model) to {model!r}.", **data)
        elif salt != self.co_salt:
            self.add("model", "fail", f"The probe prompt's chunks are stored under cache salt "
                     f"{salt!r}{by}, not {self.co_salt!r}: no lookup of the addon matches.",
                     "Set the addon's coordinator cache_salt to the servers' one.", **data)
        else:
            self.add("model", "fail", f"The probe prompt's chunks are stored for model "
                     f"{model!r}{by} with kv_rank {key.get('kv_rank')}: another world size "
                     f"than the addon's {self.co_world_size}, so no lookup matches.",
                     "Set the addon's coordinator world_size to the servers' TP x PP.", **data)

    def check_model(self, unfound_prompt: list[int] | None = None) -> None:
        try:
            rows = self.co.keys(self.timeout, limit=10000)
        except (httpx.HTTPError, StatusError, UnparsableResponse) as e:
            self.add("model", "warn", f"Could not list the directory's keys ({type(e).__name__}:"
                     f" {e}).")
            return
        models = Counter(str(r["key"].get("model_name", "")) for r in rows)
        sizes = sorted({int(r.get("num_tokens") or 0) for r in rows} - {0})
        data = {"models": dict(models), "chunk_tokens": sizes}
        prompt_rows = self._prompt_rows(unfound_prompt, rows) if unfound_prompt else []
        if prompt_rows:
            self._stored_under(prompt_rows, data)
        elif not models:
            self.add("model", "info", "The coordinator's directory is empty: which model "
                     "name the MP servers store under cannot be checked yet.", **data)
        elif self.kv_model in models:
            others = sorted(set(models) - {self.kv_model})
            self.add("model", "ok", f"The directory holds keys under model {self.kv_model!r}"
                     + (f" (and {_names(others)})." if others else "."), **data)
        else:
            listed = ", ".join(f"{m!r} ({n} keys)" for m, n in models.most_common(5))
            self.add("model", "fail", f"The directory holds keys only under {listed}, none "
                     f"under {self.kv_model!r}, the model the addon looks up with: keys hash "
                     "the model name, so every lookup comes back empty.",
                     f"Set the addon's coordinator model (--cache-model) to "
                     f"{models.most_common(1)[0][0]!r}.", **data)
        if sizes and sizes != [self.chunk]:
            self.add("model_chunk", "warn", f"Stored chunks hold {sizes} tokens, not "
                     f"{self.chunk}.", "Use one --chunk-size for the coordinator, every MP "
                     "server and the addon.", **data)

    def check_actions(self) -> None:
        cfg = self.t.config
        strategy = cfg.cache_strategy if cfg else None
        if strategy and strategy.enable_eviction:
            self.add("evict", "ok", "Eviction uses the coordinator's targeted /cache/delete "
                     "(that instance's L1 only).")
        if strategy and strategy.enable_compression:
            self.add("compress", "warn", "enable_compression is on, but the MP coordinator has "
                     "no compress route: every compression fails.",
                     "Set cache_strategy.enable_compression: false.")
        if strategy and strategy.enable_pinning:
            try:
                r = self.http.post(self.t.controller + "/cache/pins", json={
                    "model_name": self.kv_model or "x", "world_size": 1, "token_ids": []})
            except httpx.HTTPError as e:
                self.add("pin", "warn", f"Could not probe /cache/pins ({type(e).__name__}).")
                return
            if r.status_code in (404, 405):
                self.add("pin", "warn", "enable_pinning is on, but this coordinator runs no "
                         "eviction controller (no /cache/pins): every pin fails.",
                         "Set cache_strategy.enable_pinning: false.")
            else:
                self.add("pin", "info", "Pins go to the coordinator's /cache/pins: fleet-wide "
                         "protection of L2 keys from its eviction, not a per-instance pin.")


def _names(ids: Sequence[str]) -> str:
    return ", ".join(ids) if ids else "(none)"


def _vllm_error(r: httpx.Response) -> str:
    try:
        err = r.json().get("error", {})
        return str(err.get("message", "")) if isinstance(err, dict) else str(err)
    except (ValueError, AttributeError):
        return ""


# --- command line --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scripts/doctor",
        description="Check an LMCache controller, vLLM servers and a mitmproxy-kvcache "
        "config for everything that would stop cache-aware routing.",
    )
    p.add_argument("--config", help="the addon's config.yaml")
    p.add_argument("--controller", help="LMCache controller URL (overrides lmcache_endpoint)")
    p.add_argument("--endpoint", action="append", default=[], metavar="ID=URL",
                   help="a vLLM endpoint; repeat for each (replaces the config's endpoints)")
    p.add_argument("--tokenizer", help="vLLM server for /tokenize (overrides vllm_endpoint)")
    p.add_argument("--model", help="model name for /tokenize (overrides default_model)")
    p.add_argument("--prompt", help="a prompt of yours to check (default: a built-in probe)")
    p.add_argument("--no-warmup", action="store_true",
                   help="do not serve the prompt once before looking it up")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per call (default 5)")
    p.add_argument("--settle", type=float, default=5.0,
                   help="seconds to wait for a served prompt to reach the controller")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--cache-view", choices=("controller", "coordinator"),
                   help="what --controller serves: the legacy LMCache controller or the MP "
                   "coordinator (default: probe it, and compare with the config's cache_view)")
    p.add_argument("--cache-model", help="model name the MP coordinator's keys are hashed "
                   "with (default: the config's cache_model, else --model / default_model)")
    p.add_argument("--chunk-size", type=int,
                   help="the MP coordinator's tokens per chunk (default 256)")
    return p


def _coordinator_settings(cfg: KVCacheConfig | None) -> dict[str, Any]:
    """The config's cache-view settings. ``cache_world_size``, ``cache_salt`` and
    ``cache_chunk_size`` are read only if the config grows them (defaults otherwise)."""
    return {"cache_view": getattr(cfg, "cache_view", None) or "auto",
            "model": getattr(cfg, "cache_model", "") or "",
            "world_size": int(getattr(cfg, "cache_world_size", 1) or 1),
            "cache_salt": str(getattr(cfg, "cache_salt", "") or ""),
            "chunk_size": int(getattr(cfg, "cache_chunk_size", CHUNK) or CHUNK)}


def _doctor(target: Target, args: argparse.Namespace) -> Doctor:
    """The legacy doctor or the coordinator one, for what the controller URL serves.

    --cache-view forces one. Otherwise the URL is probed, so that a config naming the
    wrong view is itself reported (one FAIL) and the checks of what is there still run.
    """
    co = _coordinator_settings(target.config)
    common: dict[str, Any] = dict(warmup=not args.no_warmup, timeout=args.timeout,
                                  settle=args.settle, prompt_given=args.prompt is not None)
    prompt = args.prompt or DEFAULT_PROMPT
    configured = co["cache_view"]
    view, served = args.cache_view, None
    if view is None and configured in ("auto", "controller", "coordinator"):
        served = probe_view(target.controller, args.timeout)
        # A URL that answers neither way gets the configured view's checks, which say why.
        view = served or ("controller" if configured == "auto" else configured)
    doctor: Doctor
    if view == "coordinator":
        target.view = "coordinator"
        doctor = CoordinatorDoctor(
            target, prompt, kv_model=args.cache_model or co["model"] or target.model,
            chunk_size=args.chunk_size or co["chunk_size"], world_size=co["world_size"],
            cache_salt=co["cache_salt"], **common)
    else:
        doctor = Doctor(target, prompt, **common)
    if served and configured not in ("auto", served):
        doctor.add("cache_view", "fail", f"{target.controller} serves LMCache's "
                   f"{'MP coordinator' if served == 'coordinator' else 'legacy controller'}, "
                   f"but the config says cache_view: {configured}: the addon would ask it the "
                   "wrong questions and never route by cache.",
                   f"Set cache_view: {served} (or auto).", served=served, configured=configured)
    return doctor


def _target(args: argparse.Namespace, p: argparse.ArgumentParser) -> Target | Check:
    cfg: KVCacheConfig | None = None
    if args.config:
        try:
            cfg = load_config_file(args.config)
        except ConfigError as e:
            return Check("config", "fail", f"The config cannot be loaded: {e}.",
                         "Fix the key named above; the proxy refuses this config too.")
    endpoints: dict[str, str] = {}
    for spec in args.endpoint:
        iid, sep, url = spec.partition("=")
        if not sep or not iid or not url.startswith(("http://", "https://")):
            p.error(f"--endpoint {spec!r}: expected ID=http://host:port")
        endpoints[iid] = url.rstrip("/")
    if not endpoints and cfg:
        endpoints = {ep.id: ep.url for ep in cfg.endpoints}
    controller = args.controller or (cfg.lmcache_endpoint if cfg else "")
    if not controller or not endpoints:
        p.error("give --config, or --controller and at least one --endpoint ID=URL")
    tokenizer = args.tokenizer or (cfg.vllm_endpoint if cfg and not args.endpoint else "")
    tokenizer = tokenizer or next(iter(endpoints.values()))
    model = args.model if args.model is not None else (cfg.default_model if cfg else "")
    return Target(controller.rstrip("/"), endpoints, tokenizer.rstrip("/"), model, cfg)


_MARK = {"ok": "[ok]  ", "info": "[info]", "warn": "[WARN]", "fail": "[FAIL]"}


def render(target: Target | None, checks: list[Check]) -> str:
    lines = ["mitmproxy-kvcache doctor"]
    if target is not None:
        lines += [
            f"  {target.view:<11} {target.controller}",
            "  endpoints   " + ", ".join(f"{i}={u}" for i, u in target.endpoints.items()),
            f"  tokenizer   {target.tokenizer}"
            + (f" (model {target.model})" if target.model else ""),
        ]
    lines.append("")
    for c in checks:
        lines.append(f"{_MARK[c.status]} {c.message}")
        if c.fix and c.status in ("warn", "fail"):
            lines.append(f"       fix: {c.fix}")
    fails = sum(c.status == "fail" for c in checks)
    warns = sum(c.status == "warn" for c in checks)
    lines.append("")
    if fails:
        lines.append(f"Routing by cache cannot work: {fails} problem(s) marked FAIL.")
    elif warns:
        lines.append(f"Routing by cache can work; {warns} warning(s).")
    else:
        lines.append("Routing by cache can work.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    got = _target(args, p)
    target: Target | None = None
    if isinstance(got, Check):
        checks = [got]
    else:
        target = got
        doctor = _doctor(target, args)
        try:
            checks = doctor.run()
        finally:
            doctor.close()
    ok = not any(c.status == "fail" for c in checks)
    if args.json:
        out = {
            "ok": ok,
            "target": None if target is None else {
                "controller": target.controller, "view": target.view,
                "endpoints": target.endpoints,
                "tokenizer": target.tokenizer, "model": target.model,
            },
            "checks": [asdict(c) for c in checks],
        }
        print(json.dumps(out, indent=2))
    else:
        print(render(target, checks))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
