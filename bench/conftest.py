import pytest


@pytest.fixture(scope="module", autouse=True)
def _summary(request):
    """After a benchmark module's tests: print its ``summary_table(RESULTS)`` when it keeps one."""
    yield
    results = getattr(request.module, "RESULTS", None)
    if results:
        print("\n" + request.module.summary_table(results))
