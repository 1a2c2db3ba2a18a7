import pytest
from citadel_bench.goprofile import OTHER, ApiServerProfile, categorise

pytestmark = pytest.mark.unit

# The shape `go tool pprof -traces` prints: a header, then one block per stack,
# the sample value beside the leaf frame, callers below it.
TRACES = """File: kube-apiserver
Type: cpu
Duration: 15s, Total samples = 15.01s (100.06%)
-----------+-------------------------------------------------------
      10ms   encoding/json.(*Decoder).Decode
             k8s.io/apiserver/pkg/endpoints/handlers.(*applyPatcher).applyPatchToCurrentObject
             k8s.io/apiextensions-apiserver/pkg/registry/customresource.(*StatusREST).Update
             k8s.io/apiserver/pkg/endpoints/handlers/finisher.finishRequest.func1
-----------+-------------------------------------------------------
     1.20s   runtime.scanobject
             runtime.gcDrain
             runtime.gcBgMarkWorker
-----------+-------------------------------------------------------
      30ms   sigs.k8s.io/yaml.Unmarshal
             k8s.io/apiserver/pkg/endpoints/handlers.(*applyPatcher).applyPatchToCurrentObject
             k8s.io/apiserver/pkg/endpoints/handlers.(*patcher).patchResource.func3
-----------+-------------------------------------------------------
     500us   net/http.(*conn).serve
-----------+-------------------------------------------------------
      20ms   runtime.mcall
-----------+-------------------------------------------------------
"""


def test_each_stack_goes_to_the_first_category_it_matches() -> None:
    found = categorise(TRACES)
    assert found == pytest.approx(
        {
            # The status write applies too; it counts as what it writes.
            "LLMModel status writes": 0.01,
            "garbage collection (background)": 1.2,
            "server-side apply: merging (Deployments, Services, ...)": 0.03,
            "request plumbing (TLS, HTTP/2, authn, authz, flow control)": 0.0005,
            OTHER: 0.02,
        }
    )
    profile = ApiServerProfile(found)
    assert profile.total == pytest.approx(1.2605)
    assert profile.share("garbage collection (background)") == pytest.approx(
        1.2 / 1.2605
    )
    assert ApiServerProfile(problem="no profile").share(OTHER) == 0.0
