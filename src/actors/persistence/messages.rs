use actix::Message;

use super::DbError;
use crate::db::DbConnection;

type Work<T> = Box<dyn FnOnce(&mut DbConnection) -> Result<T, DbError> + Send>;

/// Run one unit of work (a query or a transaction) on a pooled connection.
pub struct RunQuery<T>(pub Work<T>);

impl<T: 'static> Message for RunQuery<T> {
    type Result = Result<T, DbError>;
}
