//! AccountWatch: closes the live sockets of accounts that were deactivated or whose role
//! changed, even when the change was made by another process (`switchboard user set`) or
//! another node.
//!
//! One per node, on the system arbiter. Every `realtime.account_check_interval` it asks the
//! SessionManager which accounts have sockets here, reads those accounts through the
//! persistence actor, and tells the SessionManager which connections to close. It owns
//! nothing but its timer.

use std::collections::HashSet;
use std::time::Duration;

use actix::prelude::*;

use crate::actors::persistence::Db;
use crate::actors::session_manager::messages::{ConnectedAccounts, Kick, KickConnections};
use crate::actors::session_manager::SessionManager;
use crate::db::models::{desk, Role};

/// Accounts read per query.
const ACCOUNTS_PER_QUERY: usize = 500;

pub struct AccountWatch {
    db: Db,
    manager: Addr<SessionManager>,
    every: Duration,
    /// A check is running; the next tick waits for it rather than piling up.
    busy: bool,
}

impl AccountWatch {
    pub fn new(db: Db, manager: Addr<SessionManager>, every: Duration) -> AccountWatch {
        AccountWatch {
            db,
            manager,
            every: every.max(Duration::from_millis(50)),
            busy: false,
        }
    }

    fn check(&mut self, ctx: &mut Context<Self>) {
        if self.busy {
            return;
        }
        self.busy = true;
        let (db, manager) = (self.db.clone(), self.manager.clone());
        let work = async move {
            let connected = manager.send(ConnectedAccounts).await.unwrap_or_default();
            if connected.is_empty() {
                return;
            }
            let mut ids: Vec<String> = connected.iter().map(|(_, u, _)| u.clone()).collect();
            ids.sort_unstable();
            ids.dedup();
            let read = db.run(move |c| {
                let mut accounts = std::collections::HashMap::new();
                // Bounded lists: a query has a limit on bound parameters.
                for chunk in ids.chunks(ACCOUNTS_PER_QUERY) {
                    accounts.extend(desk::accounts(c, chunk)?);
                }
                Ok(accounts)
            });
            let accounts = match read.await {
                Ok(accounts) => accounts,
                Err(e) => {
                    log::warn!("checking the accounts of live sockets failed: {e}");
                    return;
                }
            };
            let mut kicks = Vec::new();
            let mut gone: HashSet<String> = HashSet::new();
            for (conn_id, user_id, role) in connected {
                let kick = match accounts.get(&user_id) {
                    None => Some(("account_disabled", "the account no longer exists")),
                    Some((false, _)) => Some(("account_disabled", "the account was deactivated")),
                    Some((true, now)) if Role::parse(now) != Some(role) => {
                        Some(("role_changed", "the account's role changed; sign in again"))
                    }
                    Some(_) => None,
                };
                if let Some((code, message)) = kick {
                    gone.insert(user_id);
                    kicks.push((
                        conn_id,
                        Kick {
                            code,
                            message: message.into(),
                        },
                    ));
                }
            }
            if !kicks.is_empty() {
                log::info!(
                    "closing {} socket(s) of {} changed account(s)",
                    kicks.len(),
                    gone.len()
                );
                manager.do_send(KickConnections { kicks });
            }
        };
        ctx.spawn(work.into_actor(self).map(|(), act, _| act.busy = false));
    }
}

impl Actor for AccountWatch {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(self.every, |act, ctx| act.check(ctx));
    }
}
