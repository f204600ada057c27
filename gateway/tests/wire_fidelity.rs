//! Issue 20, wire fidelity: an application cannot tell the gateway from its database.

mod common;

use common::*;
use gateway::harness::Stack;

/// Item 3: with the demo's policy, a mistyped database is refused as PostgreSQL refuses it
/// (3D000), not replaced by the workload's own database. Before the change the demo forced
/// `app` and `dbname=nosuchdb` connected to it.
#[tokio::test]
async fn issue_20_a_requested_database_that_is_not_allowed_gets_3d000() {
    let spec = gateway::harness::demo::spec(gateway_bin(), false);
    let s = Stack::start(spec).expect("demo stack");
    let e = connect(&s, 0, "app", "nosuchdb").await.unwrap_err();
    let db = e.as_db_error().expect("an ErrorResponse");
    assert_eq!(db.code().code(), "3D000", "{e}");
    assert!(db.message().contains("\"nosuchdb\""), "{e}");
    assert_eq!(db.hint(), Some("Allowed database names: \"app\"."));

    // Another user is refused too, with the allowed one named, not silently replaced.
    let e = connect(&s, 0, "postgres", "app").await.unwrap_err();
    let db = e.as_db_error().expect("an ErrorResponse");
    assert_eq!(db.code().code(), "28000", "{e}");
    assert_eq!(db.hint(), Some("Allowed database users: \"app\"."));

    // The demo's own connection string works and lands where it says.
    let c = connect(&s, 0, "app", "app").await.unwrap();
    let row = c
        .query_one("SELECT current_user::text, current_database()::text", &[])
        .await
        .unwrap();
    assert_eq!(
        (row.get::<_, String>(0), row.get::<_, String>(1)),
        ("app".into(), "app".into())
    );
}
