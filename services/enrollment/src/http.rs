//! The endpoints: submit, show, and the event stream of one enrollment.

use super::*;

pub(crate) async fn submit(
    State(enrollment): State<Enrollment>,
    headers: HeaderMap,
    body: Result<StrictJson<NewEnrollment>, Problem>,
) -> Result<impl IntoResponse, Problem> {
    // StrictJson's rejections quote no value and no long digit run.
    let StrictJson(req) = body?;
    let key = idempotency_key(&headers)?;
    let (accepted, replayed) = enrollment.accept(req, key).await?;
    let mut out = HeaderMap::new();
    if let Ok(location) = HeaderValue::from_str(&format!("/enrollments/{}", accepted.id)) {
        out.insert(header::LOCATION, location);
    }
    if replayed {
        out.insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok((StatusCode::ACCEPTED, out, axum::Json(accepted)))
}

pub(crate) fn path_id(id: Result<PathId, Problem>) -> Result<String, Problem> {
    id.map(|PathId(id)| id)
        .map_err(|_| Problem::not_found("this enrollment"))
}

pub(crate) async fn show(
    State(enrollment): State<Enrollment>,
    id: Result<PathId, Problem>,
) -> Result<axum::Json<EnrollmentView>, Problem> {
    let id = path_id(id)?;
    enrollment.view(&id).await.map(axum::Json)
}

/// Server-sent events: the enrollment as it is now (`snapshot`), then each
/// change (`change`) as it is committed; bounded and ended by the
/// service's [`SseStreams`].
pub(crate) async fn stream(
    State(enrollment): State<Enrollment>,
    client: ClientIp,
    id: Result<PathId, Problem>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, Problem> {
    let id = path_id(id)?;
    let permit = enrollment.sse.open(client)?;
    // Subscribe before reading, so no change falls in between.
    let live = BroadcastStream::new(enrollment.live.subscribe());
    let view = enrollment.view(&id).await?;
    let snapshot = SseEvent::default()
        .event("snapshot")
        .json_data(&view)
        .unwrap_or_default();
    // A lagging stream skips what it missed, as the snapshot it can fetch
    // again holds it.
    let changes = live.filter_map(move |change| {
        std::future::ready(match change {
            Ok(change) if change.id == id => Some(
                SseEvent::default()
                    .event("change")
                    .json_data(&change)
                    .unwrap_or_default(),
            ),
            _ => None,
        })
    });
    Ok(enrollment.sse.respond(
        permit,
        futures::stream::once(std::future::ready(snapshot)).chain(changes),
    ))
}
