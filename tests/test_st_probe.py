import pytest, schemathesis
from hypothesis import settings, HealthCheck

@pytest.fixture
def execute_api(execute_server):
    return schemathesis.openapi.from_url(execute_server.url + "/openapi.json")

schema = schemathesis.pytest.from_fixture("execute_api")

@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_execute_api(case):
    case.call_and_validate(timeout=60)
