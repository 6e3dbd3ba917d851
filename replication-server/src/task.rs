//! Blocking work from async code: catalog calls, volume and store IO run on tokio's blocking
//! threads through [`blocking`], whose error type is the caller's own.

/// A blocking task that panicked or was cancelled, with tokio's reason.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TaskFailed(pub String);

/// Runs `f` on a blocking thread. A task that panicked becomes the caller's error (`E: From<TaskFailed>`).
pub async fn blocking<T, E>(f: impl FnOnce() -> Result<T, E> + Send + 'static) -> Result<T, E>
where
    T: Send + 'static,
    E: From<TaskFailed> + Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => Err(TaskFailed(e.to_string()).into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    struct Mine(String);

    impl From<TaskFailed> for Mine {
        fn from(e: TaskFailed) -> Self {
            Mine(format!("task failed: {e}"))
        }
    }

    #[tokio::test]
    async fn a_panicking_task_is_the_callers_error() {
        let r: Result<(), Mine> = blocking(|| panic!("boom")).await;
        assert!(r.unwrap_err().0.starts_with("task failed: "));
        let ok: Result<u8, Mine> = blocking(|| Ok(7)).await;
        assert_eq!(ok, Ok(7));
    }
}
