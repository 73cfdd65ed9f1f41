//! Enrollment: accept a student's enrollment at once, follow the payment behind the scenes.
