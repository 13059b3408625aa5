//! Pre-flight checks against the Graph API (`check-config --connect`, and the daemon at
//! start), read-only:
//! - with confirmations on, the access token and `phone_number_id`
//!   (`GET /{phone_number_id}?fields=id`): an expired or revoked token (190), a token
//!   without access to the number (10, 200–299) or an id it cannot see (100);
//! - with `waba_id` set, that an app is subscribed to the account's webhooks
//!   (`GET /{waba_id}/subscribed_apps`). Which fields (`messages`, `user_preferences`) the
//!   app subscribes to is the app's own setting, which this call does not show: that part
//!   stays unchecked. Without `waba_id` the subscription is unchecked.
//!
//! The webhook's own secrets (app secret, verify token) are Meta's to use: Meta's
//! deliveries prove them, nothing here can.

use optout_core::Finding;

use crate::client::{Class, Graph, Reply};
use crate::{Inbox, WhatsApp};

impl<I: Inbox + ?Sized> WhatsApp<I> {
    pub(crate) async fn run_preflight(&self) -> Vec<Finding> {
        let mut out = Vec::new();
        let Some(graph) = &self.graph else {
            out.push(Finding::unchecked(
                "the Graph API access token",
                "confirmations are off, so no Graph API call is made",
            ));
            return out;
        };
        let token_ok = self.check_number(graph, &mut out).await;
        if token_ok {
            self.check_subscription(graph, &mut out).await;
        }
        out
    }

    /// The token and the phone number id; false when the token itself is refused.
    async fn check_number(&self, graph: &Graph, out: &mut Vec<Finding>) -> bool {
        let id = &self.config.phone_number_id;
        let reply = graph.phone_number().await;
        let (class, said) = match &reply {
            Reply::Ok(_) => {
                out.push(Finding::pass(format!(
                    "the access token is accepted and phone number id {id} is visible"
                )));
                return true;
            }
            Reply::Graph(e) => (e.class(), e.describe()),
            Reply::Http(reason, class) => (*class, reason.clone()),
        };
        let finding = match class {
            Class::Unauthorized => Finding::fail(
                format!("Meta refused the access token: {said}"),
                "generate a new system-user token (Business settings → System users → Generate token, with whatsapp_business_messaging; choose no expiry) and store it where access_token points",
            ),
            Class::Forbidden => Finding::fail(
                format!("the access token may not use phone number id {id}: {said}"),
                "assign the WhatsApp account to the system user (Business settings → System users → Assign assets) and grant whatsapp_business_messaging",
            ),
            Class::Reject => Finding::fail(
                format!("phone number id {id} is not a number this token can see: {said}"),
                "copy the Phone number ID from the app's WhatsApp → API Setup page (not the phone number itself)",
            ),
            Class::Throttled | Class::Retry => Finding::unchecked(
                format!("the access token and phone number id {id}"),
                format!("Graph did not answer usably: {said}"),
            ),
        };
        out.push(finding);
        class != Class::Unauthorized
    }

    async fn check_subscription(&self, graph: &Graph, out: &mut Vec<Finding>) {
        let waba = &self.config.waba_id;
        if waba.is_empty() {
            out.push(Finding::unchecked(
                "the webhook subscription",
                "set waba_id (the WhatsApp Business Account id) to check it",
            ));
            return;
        }
        match graph.subscribed_apps(waba).await {
            Ok(0) => out.push(Finding::fail(
                format!("no app is subscribed to the webhooks of WhatsApp Business Account {waba}: no opt-out would reach the daemon"),
                format!("subscribe the app: POST /{waba}/subscribed_apps with the access token, or in the app's WhatsApp → Configuration"),
            )),
            Ok(n) => {
                out.push(Finding::pass(format!(
                    "{n} app(s) subscribed to the webhooks of WhatsApp Business Account {waba}"
                )));
                out.push(Finding::unchecked(
                    "the webhook fields messages and user_preferences",
                    "the Graph API does not show an app's subscribed fields; check them in the app's WhatsApp → Configuration",
                ));
            }
            Err(Reply::Graph(e)) => out.push(Finding::fail(
                format!("cannot read the subscriptions of WhatsApp Business Account {waba}: {}", e.describe()),
                "check waba_id, and that the token has whatsapp_business_management",
            )),
            Err(other) => out.push(Finding::unchecked(
                "the webhook subscription",
                format!("Graph did not answer usably: {other:?}"),
            )),
        }
    }
}
