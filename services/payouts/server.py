"""``far-mesh payouts serve``: the weekly scheduler plus /healthz, /readyz and /metrics on port 8300.

APScheduler (3.x, BackgroundScheduler) runs the payout job every Monday at 00:00 UTC in its own thread (the job
runs the async executor with ``asyncio.run``), one instance at a time, coalescing missed runs. At start a
resume-only run finishes any batch a previous process left open. When a deposit contract is configured
(``DEPOSIT_CONTRACT_ADDRESS``, or recorded by ``far-mesh chain deploy --network local``), the deposit watcher runs
every ``DEPOSIT_POLL_INTERVAL_S`` in the same scheduler. FastAPI/uvicorn serves the probes.
"""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import timezone

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from services.common.http import readiness_response
from services.common.logs import get_logger
from services.payouts import metrics

log = get_logger(__name__)

CRON = {"day_of_week": "mon", "hour": 0, "minute": 0}


class PayoutService:
    def __init__(self, settings, network: str) -> None:
        self.settings = settings
        self.network = network
        self.scheduler = None
        self.last_report = None
        self.last_error: str | None = None
        self.deposits_error: str | None = None
        self._chain = None
        self._lock = threading.Lock()

    def chain(self):
        from services.payouts.chain import connect

        if self._chain is None:
            self._chain = connect(self.settings, self.network)
        return self._chain

    def run_job(self, *, resume_only: bool = False) -> None:
        from services.payouts.executor import PayoutExecutor

        with self._lock:
            try:
                executor = PayoutExecutor.from_settings(self.settings, self.chain(), network=self.network)
                self.last_report = asyncio.run(executor.run_once(resume_only=resume_only))
                self.last_error = self.scrub("; ".join(self.last_report.errors) or None)
                log.info("payouts.job_done", resume_only=resume_only, paid_far=str(self.last_report.paid_far),
                         batches=len(self.last_report.batches), errors=self.last_report.errors)
            except Exception as error:  # noqa: BLE001 - logged, exposed on /readyz, retried next week
                self.last_error = self.scrub(f"{type(error).__name__}: {error}")
                log.error("payouts.job_failed", error=self.last_error)  # scrubbed: no traceback quoting the URL

    def run_deposits(self) -> None:
        """One deposit watcher scan (services/deposits/watcher.py), every DEPOSIT_POLL_INTERVAL_S."""
        from services.deposits.watcher import DepositWatcher

        try:
            watcher = DepositWatcher.from_settings(self.settings, self.chain())
            report = asyncio.run(watcher.run_once())
            self.deposits_error = None
            if report.credited or report.unmatched:
                log.info("deposits.job_done", credited=len(report.credited), unmatched=len(report.unmatched))
        except Exception as error:  # noqa: BLE001 - logged, exposed on /readyz, retried at the next tick
            self.deposits_error = self.scrub(f"{type(error).__name__}: {error}")
            log.error("deposits.job_failed", error=self.deposits_error)

    def deposits_enabled(self) -> bool:
        if self.settings.DEPOSIT_CONTRACT_ADDRESS:
            return True
        try:
            return getattr(self.chain(), "deposit", None) is not None
        except Exception:  # noqa: BLE001 - no chain: the payout job reports it
            return False

    def start(self) -> None:
        from apscheduler.schedulers.background import BackgroundScheduler
        from apscheduler.triggers.cron import CronTrigger

        self.scheduler = BackgroundScheduler(timezone=timezone.utc)
        self.scheduler.add_job(self.run_job, CronTrigger(timezone=timezone.utc, **CRON), id="weekly-payouts",
                               max_instances=1, coalesce=True, misfire_grace_time=6 * 3600)
        self.scheduler.add_job(self.run_job, kwargs={"resume_only": True}, id="resume-open-batches")
        if self.deposits_enabled():
            self.scheduler.add_job(self.run_deposits, "interval", seconds=self.settings.DEPOSIT_POLL_INTERVAL_S,
                                   id="deposits", max_instances=1, coalesce=True)
        self.scheduler.start()
        log.info("payouts.scheduler_started", next_run=str(self.next_run()))

    def next_run(self):
        job = self.scheduler.get_job("weekly-payouts") if self.scheduler else None
        return job.next_run_time if job else None

    def stop(self) -> None:
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=False)

    async def ready(self) -> dict:
        import asyncpg

        checks = {}
        try:
            conn = await asyncpg.connect(self.settings.POSTGRES_URL, timeout=5)
            try:
                await conn.fetchval("SELECT count(*) FROM far_payment_batches")
            finally:
                await conn.close()
            checks["postgres"] = "ok"
        except Exception as error:  # noqa: BLE001
            checks["postgres"] = f"error: {error}"
        try:
            chain = await asyncio.to_thread(self.chain)
            block = await asyncio.to_thread(lambda: chain.w3.eth.block_number)
            checks["chain"] = f"ok (block {block})"
        except Exception as error:  # noqa: BLE001
            checks["chain"] = f"error: {self.scrub(f'{type(error).__name__}: {error}')}"
        return checks

    def rpc(self) -> str | None:
        """BSC_RPC_URL as shown on /readyz: scheme and host only (providers put API keys in the path or query)."""
        from services.payouts.chain import redact_url

        return redact_url(self.settings.BSC_RPC_URL) if self.settings.BSC_RPC_URL else None

    def scrub(self, text: str | None) -> str | None:
        """An error message fit for /readyz and logs: no part of BSC_RPC_URL beyond its scheme and host."""
        from services.payouts.chain import scrub_url

        return None if text is None else scrub_url(text, self.settings.BSC_RPC_URL)


def create_app(service: PayoutService, *, start_scheduler: bool = True) -> FastAPI:
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        if start_scheduler:
            service.start()
        yield
        service.stop()

    app = FastAPI(title="Far Mesh payment tracker", lifespan=lifespan)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "time": time.time()}

    @app.get("/readyz")
    async def readyz():
        checks = await service.ready()
        problems = [f"{name}: {value}" for name, value in checks.items() if not value.startswith("ok")]
        return readiness_response(problems, checks=checks, network=service.network, rpc=service.rpc(),
                                  next_run=str(service.next_run()) if service.scheduler else None,
                                  last_error=service.last_error, deposits_error=service.deposits_error)

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app


def serve(settings, *, network: str, host: str = "127.0.0.1", port: int = 8300) -> None:
    import uvicorn

    _ = metrics  # metrics are registered on import
    service = PayoutService(settings, network)
    uvicorn.run(create_app(service), host=host, port=port, log_config=None)
