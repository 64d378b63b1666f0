"""The job API as an OpenAPI 3.1 document (``GET /openapi.json``), written next to the handlers it
describes (see docs/server.md for the prose)."""

from __future__ import annotations

from typing import Any

__all__ = ["openapi_document"]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_ERRORS = {
    "400": _json(_ref("Error"), "bad input: the message says what to change (nothing was queued)"),
    "401": _json(_ref("Error"), "no or wrong token"),
    "404": _json(_ref("Error"), "no such job"),
}
_JOB_ID = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "integer"}}

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error", "message"],
        "properties": {"error": {"type": "string"}, "message": {"type": "string"}},
    },
    "JobRequest": {
        "type": "object",
        "required": ["command", "cwd"],
        "additionalProperties": False,
        "properties": {
            "command": {"enum": ["fit", "validate", "test", "predict"]},
            "args": {"type": "array", "items": {"type": "string"}, "description": "the command line after the command"},
            "cwd": {"type": "string", "description": "absolute; relative paths and logs resolve here"},
            "name": {"type": ["string", "null"], "maxLength": 200},
            "restarts": {"type": "integer", "minimum": 0, "maximum": 100},
            "attach": {"type": "boolean", "description": "cancel the job when its client's ?attach=1 stream is gone"},
        },
    },
    "Job": {
        "type": "object",
        "properties": {
            "id": {"type": "integer"},
            "name": {"type": ["string", "null"]},
            "kind": {"enum": ["cli", "call"]},
            "command": {"type": "string"},
            "args": {"type": "array", "items": {"type": "string"}},
            "cwd": {"type": "string"},
            "state": {"enum": ["queued", "running", "succeeded", "failed", "cancelled", "interrupted"]},
            "position": {"type": ["integer", "null"], "description": "1 for the next job to run"},
            "attempt": {"type": "integer"},
            "restarts": {"type": "integer"},
            "created_at": {"type": "number"},
            "started_at": {"type": ["number", "null"]},
            "finished_at": {"type": ["number", "null"]},
            "metrics": {"type": "object", "additionalProperties": {"type": "number"}},
            "artifacts": {"type": "object", "additionalProperties": {"type": "string"}},
            "error": {
                "type": ["object", "null"],
                "properties": {
                    "type": {"type": "string"},
                    "message": {"type": "string"},
                    "traceback": {"type": ["string", "null"]},
                    "rank": {"type": ["integer", "null"]},
                },
            },
            "exit_code": {"type": ["integer", "null"], "description": "as a local lightdist command: 0, 1, 2, 130"},
            "progress": {
                "type": ["object", "null"],
                "description": "while running: step, total_steps, epoch, latest metrics",
            },
        },
    },
}


def openapi_document() -> dict[str, Any]:
    job = _json(_ref("Job"), "the job")
    return {
        "openapi": "3.1.0",
        "info": {"title": "lightdist server", "version": "1", "description": "Jobs on a warm pool (docs/server.md)."},
        "components": {
            "schemas": _SCHEMAS,
            "securitySchemes": {"token": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"token": []}],
        "paths": {
            "/v1/server": {
                "get": {
                    "summary": "the server's layout and state",
                    "responses": {"200": _json({"type": "object"}, "server")},
                }
            },
            "/v1/jobs": {
                "post": {
                    "summary": "submit a CLI job",
                    "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("JobRequest")}}},
                    "responses": {"201": job, **_ERRORS},
                },
                "get": {
                    "summary": "jobs, newest first",
                    "parameters": [
                        {"name": "state", "in": "query", "schema": {"type": "string"}},
                        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
                    ],
                    "responses": {
                        "200": _json(
                            {"type": "object", "properties": {"jobs": {"type": "array", "items": _ref("Job")}}}, "jobs"
                        )
                    },
                },
            },
            "/v1/calls": {
                "post": {
                    "summary": "submit a Python-client call (PoolStrategy(server=...))",
                    "parameters": [
                        {"name": "cwd", "in": "query", "required": True, "schema": {"type": "string"}},
                        {"name": "command", "in": "query", "schema": {"type": "string"}},
                        {"name": "attach", "in": "query", "schema": {"enum": ["0", "1"]}},
                    ],
                    "requestBody": {"content": {"application/octet-stream": {}}},
                    "responses": {"201": job, "413": _json(_ref("Error"), "over the server's size limit"), **_ERRORS},
                }
            },
            "/v1/jobs/{job_id}": {"get": {"parameters": [_JOB_ID], "responses": {"200": job, **_ERRORS}}},
            "/v1/jobs/{job_id}/cancel": {
                "post": {
                    "parameters": [_JOB_ID],
                    "responses": {"202": job, "409": _json(_ref("Error"), "the job already finished"), **_ERRORS},
                }
            },
            "/v1/jobs/{job_id}/events": {
                "get": {
                    "summary": "server-sent events; resume with Last-Event-ID; ends after 'finished'",
                    "parameters": [
                        _JOB_ID,
                        {"name": "Last-Event-ID", "in": "header", "schema": {"type": "integer"}},
                        {"name": "after", "in": "query", "schema": {"type": "integer"}},
                        {"name": "attach", "in": "query", "schema": {"enum": ["0", "1"]}},
                    ],
                    "responses": {"200": {"description": "events", "content": {"text/event-stream": {}}}, **_ERRORS},
                }
            },
            "/v1/configs": {
                "get": {
                    "summary": "the shipped configs (lightdist recipes): name, command, description",
                    "responses": {"200": _json({"type": "object"}, "configs")},
                }
            },
            "/v1/jobs/{job_id}/artifacts/{name}": {
                "get": {
                    "summary": "download a file artifact: last_checkpoint, best_checkpoint or predictions_file",
                    "parameters": [
                        _JOB_ID,
                        {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}},
                    ],
                    "responses": {
                        "200": {"description": "the file", "content": {"application/octet-stream": {}}},
                        **_ERRORS,
                    },
                }
            },
            "/v1/jobs/{job_id}/result": {
                "get": {
                    "parameters": [_JOB_ID],
                    "responses": {
                        "200": {"description": "pickled result", "content": {"application/octet-stream": {}}},
                        **_ERRORS,
                    },
                }
            },
        },
    }
