//! Link addresses and put-token audiences as Service Bus clients write them.

/// What a link address points at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Cbs,
    /// `<entity>/$management`
    Management(Entity),
    Entity(Entity),
}

/// A queue, or its dead-letter sub-queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entity {
    pub queue: String,
    pub dead_letter: bool,
}

impl Entity {
    /// The path a token must cover (`queue` or `queue/$DeadLetterQueue`).
    pub fn path(&self) -> String {
        if self.dead_letter {
            format!("{}/$DeadLetterQueue", self.queue)
        } else {
            self.queue.clone()
        }
    }
}

/// The path part of an address: `amqps://host:port/a/b`, `sb://host/a/b`, `/a/b` and `a/b`
/// all give `a/b` (clients disagree on scheme, host and port).
pub fn entity_path(address: &str) -> &str {
    let without_authority = match address.find("://") {
        Some(at) => {
            let rest = &address[at + 3..];
            rest.find('/').map_or("", |slash| &rest[slash..])
        }
        None => address,
    };
    without_authority.trim_matches('/')
}

/// Classifies a link address.
pub fn parse_node(address: &str) -> Option<Node> {
    let path = entity_path(address);
    if path.eq_ignore_ascii_case("$cbs") {
        return Some(Node::Cbs);
    }
    let (path, management) = match strip_suffix_ci(path, "/$management") {
        Some(entity) => (entity, true),
        None => (path, false),
    };
    let (queue, dead_letter) = match strip_suffix_ci(path, "/$deadletterqueue") {
        Some(queue) => (queue, true),
        None => (path, false),
    };
    if queue.is_empty() || queue.contains('/') {
        return None;
    }
    let entity = Entity {
        queue: queue.to_string(),
        dead_letter,
    };
    Some(if management {
        Node::Management(entity)
    } else {
        Node::Entity(entity)
    })
}

fn strip_suffix_ci<'a>(value: &'a str, suffix: &str) -> Option<&'a str> {
    if value.len() >= suffix.len() && value.is_char_boundary(value.len() - suffix.len()) {
        let (head, tail) = value.split_at(value.len() - suffix.len());
        tail.eq_ignore_ascii_case(suffix).then_some(head)
    } else {
        None
    }
}

/// Whether a token granted for `granted` (an entity path, or empty for the namespace) covers `path`.
pub fn covers(granted: &str, path: &str) -> bool {
    let granted = granted.trim_matches('/');
    if granted.is_empty() {
        return true;
    }
    let granted = granted.to_ascii_lowercase();
    let path = path.to_ascii_lowercase();
    path == granted || path.starts_with(&format!("{granted}/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_scheme_host_and_port() {
        assert_eq!(entity_path("amqps://localhost:5671/queue.1"), "queue.1");
        assert_eq!(entity_path("sb://localhost/queue.1"), "queue.1");
        assert_eq!(entity_path("queue.1"), "queue.1");
        assert_eq!(entity_path("sb://localhost"), "");
    }

    #[test]
    fn classifies_nodes() {
        assert_eq!(parse_node("$cbs"), Some(Node::Cbs));
        assert_eq!(
            parse_node("amqps://h:1/q/$DeadLetterQueue"),
            Some(Node::Entity(Entity {
                queue: "q".into(),
                dead_letter: true
            }))
        );
        assert_eq!(
            parse_node("q/$management"),
            Some(Node::Management(Entity {
                queue: "q".into(),
                dead_letter: false
            }))
        );
        assert_eq!(
            parse_node("q/$deadletterqueue/$management"),
            Some(Node::Management(Entity {
                queue: "q".into(),
                dead_letter: true
            }))
        );
        assert_eq!(parse_node("a/b"), None);
        assert_eq!(parse_node(""), None);
    }

    #[test]
    fn grants_cover_sub_paths() {
        assert!(covers("queue.1", "queue.1/$DeadLetterQueue"));
        assert!(covers("Queue.1", "queue.1"));
        assert!(covers("", "anything"));
        assert!(!covers("queue.1", "queue.10"));
    }
}
