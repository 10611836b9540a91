//! `inferd chat` in a real terminal (tmux): the load progress, a streamed reply, Ctrl-C
//! stopping a reply but not the program, /save, and /exit leaving cleanly.

use std::process::Command;
use std::time::{Duration, Instant};

use super::common::scratch_dir;
use super::server::Server;

struct Tmux(String);

impl Tmux {
    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("tmux").args(args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
    fn send(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", &self.0];
        args.extend(keys);
        self.run(&args);
    }
    fn screen(&self) -> String {
        self.run(&["capture-pane", "-p", "-J", "-S", "-200", "-t", &self.0])
    }
    fn wait_for(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let screen = self.screen();
            if screen.contains(needle) {
                return screen;
            }
            assert!(Instant::now() < deadline, "no {needle:?} on screen:\n{screen}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        self.run(&["kill-session", "-t", &self.0]);
    }
}

#[test]
fn chat_in_a_terminal_loads_streams_stops_saves_and_exits() {
    if Command::new("tmux").arg("-V").output().is_err() {
        eprintln!("tmux is not installed: the terminal chat test cannot run here");
        return;
    }
    let s = Server::launch(&[], &[]);
    let saved = scratch_dir("chat-cli").join("chat.json");
    let session = Tmux(format!("inferd-chat-{}", std::process::id()));
    let command = format!(
        "{} chat HuggingFaceTB/SmolLM2-135M-Instruct --url http://127.0.0.1:{}; echo EXITED=$?; sleep 60",
        env!("CARGO_BIN_EXE_inferd"),
        s.port
    );
    session.run(&["new-session", "-d", "-s", &session.0, "-x", "150", "-y", "50", &command]);
    // The load: its stages are summed up once the bars are done.
    let screen = session.wait_for("(/help for commands)");
    assert!(
        screen.contains("HuggingFaceTB/SmolLM2-135M-Instruct@main loaded in")
            && screen.contains("(processor, config, weights 272/272)"),
        "{screen}"
    );
    session.send(&["/set temperature=0", "Enter"]);
    session.send(&["What is the capital of France?", "Enter"]);
    session.wait_for("The capital of France is Paris.\n> ");
    // A long reply, stopped by Ctrl-C; the program goes on.
    session.send(&["Write a very long story about a dragon.", "Enter"]);
    session.wait_for("dragon named");
    session.send(&["C-c"]);
    session.wait_for("[stopped]\n> ");
    session.send(&["/save ", saved.to_str().unwrap(), "Enter"]);
    session.wait_for("(saved to");
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&saved).unwrap()).unwrap();
    let messages = doc["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 4, "{doc}");
    assert_eq!(messages[1]["content"], "The capital of France is Paris.");
    assert_eq!(doc["settings"], serde_json::json!({"temperature": 0}));
    // The stopped request left no sequence running on the server.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !s
        .request("GET", "/metrics", &[], None)
        .body
        .contains("inferd_sequences_running{model=\"HuggingFaceTB/SmolLM2-135M-Instruct@main\"} 0\n")
    {
        assert!(Instant::now() < deadline, "the stopped reply is still generating");
        std::thread::sleep(Duration::from_millis(100));
    }
    session.send(&["/exit", "Enter"]);
    session.wait_for("EXITED=0");
}

#[test]
fn chat_in_a_terminal_attaches_images() {
    if Command::new("tmux").arg("-V").output().is_err() {
        eprintln!("tmux is not installed: the terminal chat test cannot run here");
        return;
    }
    let model = "inferd-test/tiny-qwen2.5-vl";
    let s = Server::launch(&[], &[]);
    let saved = scratch_dir("chat-cli-image").join("chat.json");
    let session = Tmux(format!("inferd-chat-image-{}", std::process::id()));
    let command = format!(
        "{} chat {model} --url http://127.0.0.1:{}; echo EXITED=$?; sleep 60",
        env!("CARGO_BIN_EXE_inferd"),
        s.port
    );
    session.run(&["new-session", "-d", "-s", &session.0, "-x", "150", "-y", "50", &command]);
    session.wait_for("(/help for commands)");
    let image = super::common::fixture("images/chelsea.png");
    session.send(&["/image ", image.to_str().unwrap(), "Enter"]);
    session.wait_for("(image 1 attached to your next message)");
    session.send(&["/image /no/such/file.png", "Enter"]);
    session.wait_for("error: /no/such/file.png");
    session.send(&["/set max_tokens=4", "Enter"]);
    session.send(&["What is in this picture?", "Enter"]);
    // The random-weight model's reply is gibberish; the next prompt shows it ended.
    let deadline = Instant::now() + Duration::from_secs(60);
    while session.screen().matches("\n> ").count() < 5 {
        assert!(Instant::now() < deadline, "no reply:\n{}", session.screen());
        std::thread::sleep(Duration::from_millis(100));
    }
    session.send(&["/save ", saved.to_str().unwrap(), "Enter"]);
    session.wait_for("(saved to");
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&saved).unwrap()).unwrap();
    let messages = doc["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 2, "{doc}");
    let parts = messages[0]["content"].as_array().unwrap();
    assert!(parts[0]["image_url"]["url"]
        .as_str()
        .unwrap()
        .starts_with("data:image/png;base64,iVBOR"));
    assert_eq!(
        parts[1],
        serde_json::json!({"type": "text", "text": "What is in this picture?"})
    );
    // Only the missing file was an error (a failed reply would have taken the message
    // out of the conversation, too).
    assert_eq!(session.screen().matches("error:").count(), 1, "{}", session.screen());
    session.send(&["/exit", "Enter"]);
    session.wait_for("EXITED=0");
}
