"""The Chat tab: streaming multi-turn chat over the same AsyncEngine as the OpenAI API.

Chat users and API users share one continuous batch: a reply is `engine.generate` on the
chat-templated history, streamed into a gr.Chatbot. Stop cancels the Gradio event; the
cancellation leaves `engine.generate`'s iteration, which aborts the request and frees its
KV blocks (and `_stream` closes the stream explicitly on every other way out)."""

from __future__ import annotations

import asyncio
import html
import logging
import time

import gradio as gr

from inference.async_engine import AsyncEngine
from inference.compute_thread import in_fresh_thread
from inference.config import SamplingParams
from inference.errors import InferenceError, InvalidParameter

from .chat_images import ACCEPTED, message_parts, read_pictures
from .chat_state import (
    LOADING,
    NOT_UNICODE,
    ChatState,
    Exchange,
    GenDefaults,
    describe,
    is_unicode,
    model_defaults,
    render,
    to_messages,
)
from .errors import APIError
from .images import ImageLimits

log = logging.getLogger(__name__)


class ChatController:
    """Event handlers of the Chat tab, bound to one AsyncEngine."""

    def __init__(self, engine: AsyncEngine, image_limits: ImageLimits | None = None):
        self.engine = engine
        self.image_limits = image_limits or ImageLimits()

    def banner(self) -> str:
        name = html.escape(self.engine.model_name)
        info = self.engine.info()
        if not self.engine.ready or info is None:
            return f'<div class="banner banner-wait">⏳ model loading… <b>{name}</b></div>'
        return (
            f'<div class="banner banner-ok">● <b>{name}</b> ready · context '
            f"{info.max_model_len} tokens · device {html.escape(info.device)}"
            f"{'' if info.quant == 'none' else f' · {info.quant} weights'}</div>"
        )

    def take_message(self, value: str | dict, state: ChatState):
        """Send: append the user's message and pictures (the generation step that follows
        streams the reply)."""
        text, images = message_parts(value)
        if state.busy:
            gr.Warning("A reply is still streaming: wait for it or press Stop.")
            return gr.skip(), state, gr.skip()
        if not text.strip() and not images:
            return gr.skip(), state, gr.skip()
        if not is_unicode(text):
            gr.Warning(f"Your message {NOT_UNICODE}.")
            return gr.skip(), state, gr.skip()
        state.exchanges.append(Exchange(text, images))
        return "", state, render(state)  # clears the text and the attached pictures

    def prepare_regenerate(self, state: ChatState):
        """Regenerate: drop the last reply and mark its exchange pending again."""
        if state.busy or not state.exchanges:
            return state, gr.skip()
        last = state.exchanges[-1]
        state.exchanges[-1] = Exchange(last.user, last.images)
        return state, render(state)

    def clear(self, state: ChatState):
        """Clear (also cancels a running reply). In place: a generation still unwinding
        yields this same object, so it cannot bring the old conversation back."""
        state.exchanges.clear()
        return state, []

    async def after_stop(self, state: ChatState):
        """Re-render once the cancelled generation has unwound: the browser fires the cancel
        without waiting for it, so give the generation's `finally` a moment to mark it."""
        for _ in range(50):
            if not state.busy:
                break
            await asyncio.sleep(0.05)
        return render(state)

    async def generate(
        self,
        state: ChatState,
        system: str,
        temperature: float,
        top_p: float,
        top_k: float,
        max_tokens: float,
        seed: float | None,
        repetition_penalty: float,
    ):
        ex = state.pending()
        if ex is None or state.busy:
            yield gr.skip(), state
            return
        state.busy = True
        deltas = self._stream(ex, state, system, temperature, top_p, top_k, max_tokens, seed, repetition_penalty)
        try:
            async for _ in deltas:
                yield render(state), state
        finally:
            # Gradio may drop this generator (tab closed) instead of cancelling it: close the
            # inner one explicitly so the engine request is aborted now, not at GC time.
            await deltas.aclose()
            state.busy = False
            ex.done = True
        yield render(state), state

    async def _stream(
        self,
        ex: Exchange,
        state: ChatState,
        system: str,
        temperature,
        top_p,
        top_k,
        max_tokens,
        seed,
        repetition_penalty,
    ):
        """Fill `ex` from the engine, yielding after every delta. Errors land in `ex.error`."""
        if not self.engine.accepting:  # loading; while a lost stage is replaced, requests wait
            ex.error = LOADING
            return
        if not is_unicode(system):
            ex.error = f"The system prompt {NOT_UNICODE}."
            return
        images = None
        try:
            messages = to_messages(system, state.exchanges)
            pictures = [p for e in state.exchanges if e.error is None for p in e.images]
            if pictures and not self.engine.has_vision:
                raise InvalidParameter("messages", f"{self.engine.model_name} has no vision: it cannot read images")
            if pictures:
                read = await asyncio.to_thread(read_pictures, pictures, self.image_limits)
                ids, images = await in_fresh_thread(self.engine.encode_chat_images, messages, read)
            else:
                ids = self.engine.encode_chat(messages)
            # A chat UI should not refuse a long reply: cap it to the context left.
            room = self.engine.max_model_len - len(ids)
            params = SamplingParams(
                temperature=float(temperature),
                top_p=float(top_p),
                top_k=int(top_k),
                max_tokens=max(1, min(int(max_tokens), room)) if room >= 1 else int(max_tokens),
                seed=None if seed is None or int(seed) < 0 else int(seed),
                repetition_penalty=float(repetition_penalty),
            )
        except (InferenceError, APIError, ValueError, TypeError) as e:
            ex.error = describe(e)
            return
        t0 = time.perf_counter()
        t_first = t_last = None
        stream = self.engine.generate(ids, params, images)  # admission errors raise on the first step
        try:
            async for out in stream:
                now = time.perf_counter()
                if out.token_ids and t_first is None:
                    t_first = now
                    ex.ttft_s = now - t0
                if out.token_ids:
                    t_last = now
                ex.reply += out.text
                ex.tokens = out.num_output_tokens
                ex.cached_tokens = out.num_cached_tokens
                if out.finished:
                    ex.finish = out.finish_reason
                # Decode rate after the first token: prefill time is already in ttft.
                if t_first is not None and t_last is not None and ex.tokens > 1 and t_last > t_first:
                    ex.tok_s = (ex.tokens - 1) / (t_last - t_first)
                yield
        except asyncio.CancelledError:
            ex.finish = "stopped"  # Stop (or a closed tab) cancelled this event
            log.info("chat generation stopped after %d tokens", ex.tokens)
            raise
        except GeneratorExit:
            ex.finish = "stopped"
            raise
        except InferenceError as e:
            ex.error = describe(e)
        except Exception as e:  # never a silent stop: show what happened
            log.exception("chat generation failed")
            ex.error = f"generation failed: {type(e).__name__}: {e}"
        finally:
            # Closing aborts the request in the engine (frees its KV blocks) unless it finished.
            await stream.aclose()


def build_chat_tab(ctrl: ChatController) -> None:
    """Components and events of the Chat tab; call inside `with gr.Tab(...)`."""
    d = GenDefaults()
    banner = gr.HTML(ctrl.banner(), elem_id="chat-banner", js_on_load=None)
    state = gr.State(ChatState())
    with gr.Row(equal_height=False, elem_id="chat-layout"):
        with gr.Column(scale=3, min_width=320, elem_id="chat-main"):
            chatbot = gr.Chatbot(
                elem_id="chatbot",
                show_label=False,
                height=520,
                min_height=320,
                buttons=["copy"],
                feedback_options=None,
                layout="bubble",
                placeholder="**Ask anything.** Replies stream in as the model writes them.",
            )
            # Pictures: the upload button, drag and drop, or paste (shown only to vision models'
            # users as thumbnails; a text-only model answers that it cannot read them).
            msg = gr.MultimodalTextbox(
                placeholder="Message… (Enter to send; attach, drop or paste pictures)",
                show_label=False,
                lines=1,
                max_lines=8,
                elem_id="chat-input",
                autofocus=True,
                file_types=ACCEPTED,
                file_count="multiple",
                sources=["upload"],
                submit_btn=False,
            )
            with gr.Row(elem_id="chat-buttons"):
                send = gr.Button("Send", variant="primary", elem_id="send-btn", min_width=80)
                stop = gr.Button("Stop", variant="stop", elem_id="stop-btn", min_width=80)
                regen = gr.Button("Regenerate", elem_id="regen-btn", min_width=80)
                clear = gr.Button("Clear", elem_id="clear-btn", min_width=80)
        with gr.Column(scale=1, min_width=260, elem_id="chat-side"):
            system = gr.Textbox(
                label="System prompt", lines=3, elem_id="system-prompt", placeholder="e.g. You are a concise assistant."
            )
            with gr.Accordion("Parameters", open=True, elem_id="params"):
                temperature = gr.Slider(0, 2, d.temperature, step=0.05, label="Temperature", elem_id="temperature")
                top_p = gr.Slider(0.01, 1, d.top_p, step=0.01, label="Top-p", elem_id="top-p")
                top_k = gr.Slider(0, 200, d.top_k, step=1, label="Top-k (0 = off)", elem_id="top-k")
                max_tokens = gr.Slider(1, 4096, d.max_tokens, step=1, label="Max tokens", elem_id="max-tokens")
                rep = gr.Slider(
                    0.5, 2, d.repetition_penalty, step=0.01, label="Repetition penalty", elem_id="rep-penalty"
                )
                seed = gr.Number(d.seed, precision=0, label="Seed (-1 = random)", elem_id="seed")
    params = [temperature, top_p, top_k, max_tokens, seed, rep]  # GenDefaults order
    gen_inputs = [state, system, temperature, top_p, top_k, max_tokens, seed, rep]
    gen_kwargs = dict(
        outputs=[chatbot, state], show_progress="hidden", concurrency_limit=None
    )  # every chat joins the engine's batch
    events = []
    for trigger in (send.click, msg.submit):
        step = trigger(ctrl.take_message, [msg, state], [msg, state, chatbot], queue=False)
        events.append(step.then(ctrl.generate, gen_inputs, **gen_kwargs))
    step = regen.click(ctrl.prepare_regenerate, [state], [state, chatbot], queue=False)
    events.append(step.then(ctrl.generate, gen_inputs, **gen_kwargs))
    stop.click(None, cancels=events).then(ctrl.after_stop, [state], [chatbot], queue=False)
    clear.click(ctrl.clear, [state], [state, chatbot], cancels=events, queue=False)
    chatbot.clear(ctrl.clear, [state], [state, chatbot], cancels=events, queue=False)  # its 🗑 icon

    # Until the model is ready: poll the banner; then set the controls to its defaults once.
    applied = gr.State(False)
    timer = gr.Timer(1.0)

    def tick(done: bool):
        skip = [gr.skip()] * len(params)
        if not ctrl.engine.ready:
            return [ctrl.banner(), gr.skip(), False, *skip]
        if done:
            return [ctrl.banner(), gr.Timer(active=False), True, *skip]
        info = ctrl.engine.info()
        d = model_defaults(info.generation_config if info is not None else {})
        return [
            ctrl.banner(),
            gr.Timer(active=False),
            True,
            d.temperature,
            d.top_p,
            d.top_k,
            d.max_tokens,
            d.seed,
            d.repetition_penalty,
        ]

    timer.tick(tick, [applied], [banner, timer, applied, *params], show_progress="hidden", queue=False)
