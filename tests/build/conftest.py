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
