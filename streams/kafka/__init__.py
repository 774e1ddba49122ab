"""The streaming shell: Kafka topics, the Faust worker app, the LTM sink, producers and replay.

It only wires topics and tables to the stage functions of ``streams`` (``compress_turns``,
``segment.segment``/``flush``, ``stm.add``/``due``/``flush``, ``Extractor.extract``,
``summary_to_memories``/``write_memories``); no stage logic lives here.

- ``topics``  — topic specs from ``settings.kafka``, idempotent creation, record (de)serialisation;
- ``app``     — the Faust worker: sensory processor and STM aggregator agents, idle-flush timer;
- ``sink``    — the LTM sink: summaries → memories → the store, offsets committed after the write;
- ``produce`` — turns → the raw-turn topic (idempotent producer, key = user id);
- ``replay``  — rebuild memory into a fresh collection from the raw-turn log.
"""
