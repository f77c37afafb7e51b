//! The server API's OpenAPI 3.0 document, served at `/api/v1/openapi.json`. The schemas come
//! from the Rust types the API reads and writes (schemars), so they cannot drift from the
//! implementation; the paths are written out here. e2e/tests/node_api.rs checks the running
//! API against this document with schemathesis.

use schemars::JsonSchema;
use schemars::generate::{Contract, SchemaSettings};
use serde_json::{Map, Value, json};

use super::{
    BroadcastRequest, BroadcastResult, DisconnectRequest, Disconnected, ErrorBody, HistoryPage, PresencePage,
    PublishRequest, Published, RoomList,
};
use crate::hub::room::RoomStats;

/// Component schemas of the request types (as they are read) and the response types (as they
/// are written).
fn components() -> Map<String, Value> {
    let mut requests = SchemaSettings::openapi3().with(|s| s.contract = Contract::Deserialize).into_generator();
    requests.subschema_for::<PublishRequest>();
    requests.subschema_for::<BroadcastRequest>();
    requests.subschema_for::<DisconnectRequest>();
    let mut responses = SchemaSettings::openapi3().with(|s| s.contract = Contract::Serialize).into_generator();
    responses.subschema_for::<Published>();
    responses.subschema_for::<BroadcastResult>();
    responses.subschema_for::<HistoryPage>();
    responses.subschema_for::<PresencePage>();
    responses.subschema_for::<RoomList>();
    responses.subschema_for::<RoomStats>();
    responses.subschema_for::<Disconnected>();
    responses.subschema_for::<ErrorBody>();
    let mut schemas = requests.take_definitions(true);
    schemas.extend(responses.take_definitions(true));
    schemas
}

fn schema_ref<T: JsonSchema>() -> Value {
    json!({ "$ref": format!("#/components/schemas/{}", T::schema_name()) })
}

fn json_body(schema: Value) -> Value {
    json!({ "content": { "application/json": { "schema": schema } } })
}

/// The answers every authenticated operation may give besides its own.
fn responses(ok: &str, ok_schema: Value, extra: &[&str]) -> Value {
    let error = json_body(schema_ref::<ErrorBody>());
    let describe = |code: &str| match code {
        "400" => "Bad input; `field` names the part at fault",
        "401" => "Missing or invalid API key",
        "403" => "No `auth.rooms` rule covers the room",
        "404" => "The room is not on this node, or the API is off (`api_disabled`)",
        "413" => "The body is larger than `limits.max_message_bytes` (or the request over 17 MiB)",
        "429" => "The room would be new and the node holds `limits.max_rooms` rooms",
        "503" => "Not committed in time, no quorum, or draining: retry (with the same key)",
        _ => "Error",
    };
    let mut all = Map::new();
    all.insert(ok.to_owned(), json!({ "description": "OK" }));
    if let Some(Value::Object(ok_answer)) = all.get_mut(ok) {
        ok_answer.extend(json_body(ok_schema).as_object().cloned().unwrap_or_default());
    }
    for code in ["400", "401"].iter().chain(extra) {
        let mut answer = json!({ "description": describe(code) });
        if let (Value::Object(answer), Some(body)) = (&mut answer, error.as_object()) {
            answer.extend(body.clone());
        }
        all.insert((*code).to_owned(), answer);
    }
    Value::Object(all)
}

fn room_parameter() -> Value {
    json!({
        "name": "room", "in": "path", "required": true,
        "description": "Room name: 1–128 characters of `[A-Za-z0-9_.:@-]`",
        "schema": { "type": "string", "minLength": 1, "maxLength": 128, "pattern": "^[A-Za-z0-9_.:@-]+$" }
    })
}

fn query_parameter(name: &str, description: &str, schema: Value) -> Value {
    json!({ "name": name, "in": "query", "required": false, "description": description, "schema": schema })
}

/// The whole document.
pub fn document() -> Value {
    let count = json!({ "type": "integer", "minimum": 0 });
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "ChatCluster server API",
            "version": "1",
            "description": "For an application's backend: publish into rooms (as clients' publishes, \
                with the same idempotency keys), read history and presence, list rooms, disconnect \
                users. Served by every node on its admin port; any node answers. See docs/api.md."
        },
        "servers": [{ "url": "/api/v1" }],
        "security": [{ "apiKey": [] }],
        "components": {
            "securitySchemes": {
                "apiKey": { "type": "http", "scheme": "bearer", "description": "A key of admin.api_keys_file" }
            },
            "schemas": components()
        },
        "paths": {
            "/rooms/{room}/messages": { "post": {
                "operationId": "publish",
                "summary": "Publish a message to a room; answers once it is committed",
                "parameters": [room_parameter()],
                "requestBody": { "required": true, "content": { "application/json": {
                    "schema": schema_ref::<PublishRequest>() } } },
                "responses": responses("200", schema_ref::<Published>(), &["403", "413", "429", "503"])
            }},
            "/broadcast": { "post": {
                "operationId": "broadcast",
                "summary": "Publish one message to several rooms; each room's outcome is reported",
                "requestBody": { "required": true, "content": { "application/json": {
                    "schema": schema_ref::<BroadcastRequest>() } } },
                "responses": responses("200", schema_ref::<BroadcastResult>(), &["403", "413", "429"])
            }},
            "/rooms": { "get": {
                "operationId": "listRooms",
                "summary": "Rooms the answering node holds, with presence and local subscribers",
                "responses": responses("200", schema_ref::<RoomList>(), &[])
            }},
            "/rooms/{room}": { "get": {
                "operationId": "roomInfo",
                "summary": "One room's stream position, presence and local subscribers",
                "parameters": [room_parameter()],
                "responses": responses("200", schema_ref::<RoomStats>(), &["404"])
            }},
            "/rooms/{room}/history": { "get": {
                "operationId": "history",
                "summary": "A page of the room's history: the newest, or forward from a position",
                "parameters": [
                    room_parameter(),
                    query_parameter("since_epoch", "With since_offset: read forward from this position",
                        json!({ "type": "string" })),
                    query_parameter("since_offset", "With since_epoch", count.clone()),
                    query_parameter("limit", "At most this many messages", json!({ "type": "integer", "minimum": 1 })),
                ],
                "responses": responses("200", schema_ref::<HistoryPage>(), &["404"])
            }},
            "/rooms/{room}/presence": { "get": {
                "operationId": "presence",
                "summary": "A page of the users present in the room, on any node",
                "parameters": [
                    room_parameter(),
                    query_parameter("offset", "The `next` of the previous page", count),
                ],
                "responses": responses("200", schema_ref::<PresencePage>(), &["404"])
            }},
            "/users/{user}/disconnect": { "post": {
                "operationId": "disconnectUser",
                "summary": "Close every connection of a user, on every node",
                "parameters": [{
                    "name": "user", "in": "path", "required": true, "description": "The user's id (`sub`)",
                    "schema": { "type": "string", "minLength": 1, "maxLength": 128 }
                }],
                "requestBody": { "required": false, "content": { "application/json": {
                    "schema": schema_ref::<DisconnectRequest>() } } },
                "responses": responses("200", schema_ref::<Disconnected>(), &[])
            }}
        }
    })
}
