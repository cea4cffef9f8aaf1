"""Generated code is produced by one command and committed; stale output fails here."""

from __future__ import annotations

from mhv_tools import gen_protos


def test_generated_protobuf_code_matches_the_protos() -> None:
    assert gen_protos.main(["--check"]) == 0, "libs/gen is stale: run `make generate`"


def test_every_rpc_named_in_the_contract_exists() -> None:
    from mahavishnu.audit.v1 import audit_pb2
    from mahavishnu.task.v1 import task_pb2
    from mahavishnu.webhook.v1 import webhook_pb2

    def methods(module: object, service: str) -> set[str]:
        return {m.name for m in module.DESCRIPTOR.services_by_name[service].methods}

    assert methods(task_pb2, "TaskService") >= {
        "CreateTask",
        "GetTask",
        "ListTasks",
        "UpdateTask",
        "DeleteTask",
        "SearchTasks",
        "AssignTask",
        "StartTask",
        "CompleteTask",
        "CancelTask",
        "BlockTask",
        "UnblockTask",
    }
    assert methods(task_pb2, "UserService") >= {
        "CreateUser",
        "GetUser",
        "ListUsers",
        "DeactivateUser",
    }
    assert methods(audit_pb2, "AuditService") == {
        "RecordEvents",
        "ListAuditEvents",
        "VerifyAuditChain",
    }
    assert methods(webhook_pb2, "WebhookAdminService") == {
        "ListDeliveries",
        "GetDelivery",
        "RetryDelivery",
    }
