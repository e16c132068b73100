"""mkt build's tests share one local SparkSession (its JVM starts once); it is stopped when they are done, so the
rest of the suite does not run beside an idle JVM and its Python workers."""

import pytest


@pytest.fixture(scope="package", autouse=True)
def _stop_spark_after_the_build_tests():
    yield
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        return
    active = SparkSession.getActiveSession() or SparkSession._instantiatedSession
    if active is not None:
        active.stop()
    # stop() leaves the JVM running (py4j's gateway): an idle JVM still took ~5% of a core for the rest of the suite
    from pyspark import SparkContext

    gateway = SparkContext._gateway
    if gateway is not None:
        proc = getattr(gateway, "proc", None)
        gateway.shutdown()
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)
        SparkContext._gateway = None
        SparkContext._jvm = None
